"""The OpenAI request bodies: what is accepted, how it maps to the engine, and that anything
not implemented is refused with a message naming the field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from sage_ray.serve.openai_schema import MAX_N, ChatCompletionRequest, CompletionRequest

USER = [{"role": "user", "content": "hi"}]


def refused(model, body: dict) -> str:
    with pytest.raises(ValidationError) as err:
        model.model_validate(body)
    return str(err.value)


def test_text_parts_are_joined_and_other_parts_refused():
    body = ChatCompletionRequest.model_validate({"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]}]})
    assert [m.engine_message() for m in body.messages] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    message = refused(ChatCompletionRequest, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]})
    assert "image_url" in message and "only text parts" in message


def test_every_unknown_or_unimplemented_field_is_refused_by_name():
    for field, value in (("audio", {"voice": "alloy"}), ("modalities", ["text", "audio"]), ("suffix", "x"),
                         ("prediction", {"type": "content", "content": "x"}), ("web_search_options", {})):
        assert field in refused(ChatCompletionRequest, {"messages": USER, field: value})
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert "only 'auto' and 'none'" in refused(ChatCompletionRequest, {"messages": USER, "tools": tools,
                                                                       "tool_choice": "required"})
    assert "stream" in refused(ChatCompletionRequest, {"messages": USER, "tools": tools, "stream": True})
    assert "parallel_tool_calls" in refused(ChatCompletionRequest, {"messages": USER, "tools": tools,
                                                                    "parallel_tool_calls": False})
    assert "name" in refused(ChatCompletionRequest, {"messages": [{"role": "user", "content": "x", "name": "bob"}]})
    assert "suffix" in refused(CompletionRequest, {"prompt": "x", "suffix": "y"})
    assert "best_of" in refused(CompletionRequest, {"prompt": "x", "best_of": 3})


def test_null_counts_as_not_sent():
    body = ChatCompletionRequest.model_validate({"messages": USER, "audio": None, "tools": None, "n": None,
                                                 "stop": None, "response_format": None})
    assert body.n == 1 and body.engine_request() == {}


def test_bounds_and_dependencies():
    assert "less than or equal" in refused(ChatCompletionRequest, {"messages": USER, "n": MAX_N + 1})
    assert "top_logprobs: needs logprobs" in refused(ChatCompletionRequest, {"messages": USER, "top_logprobs": 2})
    assert "only allowed with stream" in refused(ChatCompletionRequest, {"messages": USER,
                                                                         "stream_options": {"include_usage": True}})
    assert "at most 4 stop" in refused(ChatCompletionRequest, {"messages": USER, "stop": list("abcde")})
    assert "token ids" in refused(ChatCompletionRequest, {"messages": USER, "logit_bias": {"hello": 5}})
    assert "[-100, 100]" in refused(ChatCompletionRequest, {"messages": USER, "logit_bias": {"5": 500}})
    assert "presence_penalty" in refused(ChatCompletionRequest, {"messages": USER, "presence_penalty": 2.5})


def test_response_formats_map_to_a_json_schema_or_a_clear_refusal():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    body = ChatCompletionRequest.model_validate({"messages": USER, "response_format": {
        "type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}})
    assert body.engine_request()["json_schema"] == schema
    assert ChatCompletionRequest.model_validate({"messages": USER, "response_format": {"type": "json_object"}}
                                                ).engine_request()["json_schema"] == {"type": "object"}
    assert "json_schema" not in ChatCompletionRequest.model_validate(
        {"messages": USER, "response_format": {"type": "text"}}).engine_request()
    assert "Unimplemented keys" in refused(ChatCompletionRequest, {"messages": USER, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}}})
    assert "exactly when" in refused(ChatCompletionRequest, {"messages": USER, "response_format": {"type": "json_schema"}})


def test_chat_request_maps_every_honoured_field():
    body = ChatCompletionRequest.model_validate({
        "messages": USER, "max_tokens": 9, "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9,
        "stop": "END", "seed": 3, "presence_penalty": 0.5, "frequency_penalty": -0.5, "logit_bias": {"17": -100},
        "logprobs": True, "top_logprobs": 2, "user": "u-1", "n": 2})
    assert body.engine_request() == {
        "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "stop": ["END"], "seed": 3, "presence_penalty": 0.5,
        "frequency_penalty": -0.5, "logit_bias": {17: -100}, "logprobs": True, "top_logprobs": 2}


def test_completion_request_prompts_and_logprobs():
    body = CompletionRequest.model_validate({"prompt": ["a", "b"], "logprobs": 2, "n": 2})
    assert body.prompts == ["a", "b"] and body.engine_request() == {"max_tokens": 16, "logprobs": True,
                                                                     "top_logprobs": 2}
    assert "token-id prompts" in refused(CompletionRequest, {"prompt": [[1, 2, 3]]})
    assert "empty" in refused(CompletionRequest, {"prompt": ""})


def test_fine_tune_request_maps_hyperparameters_and_refuses_the_rest():
    from sage_ray.serve.openai_finetune import FineTuneRequest

    body = FineTuneRequest.model_validate({"model": "tiny", "training_file": "file-x", "method": {
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": "auto"}}}})
    assert body.effective_hyperparameters().n_epochs == 2
    assert body.effective_hyperparameters().learning_rate_multiplier == "auto"
    dpo = FineTuneRequest.model_validate({"model": "m", "training_file": "f", "method": {
        "type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1}}}})
    assert dpo.method_type == "dpo" and dpo.effective_hyperparameters().beta == 0.2
    assert "reinforcement" in refused(FineTuneRequest, {"model": "m", "training_file": "f",
                                                        "method": {"type": "reinforcement"}})
    assert "block of its type" in refused(FineTuneRequest, {"model": "m", "training_file": "f", "method": {
        "type": "dpo", "supervised": {"hyperparameters": {"n_epochs": 1}}}})
    assert FineTuneRequest.model_validate({"model": "m", "training_file": "f",
                                           "validation_file": "file-y"}).validation_file == "file-y"
    assert "once" in refused(FineTuneRequest, {"model": "m", "training_file": "f",
                                               "hyperparameters": {"n_epochs": 1},
                                               "method": {"type": "supervised", "supervised": {
                                                   "hyperparameters": {"n_epochs": 2}}}})
    assert "metadata" in refused(FineTuneRequest, {"model": "m", "training_file": "f", "metadata": {"a": "b"}})
    assert "suffix" in refused(FineTuneRequest, {"model": "m", "training_file": "f", "suffix": "../x"})


README = Path(__file__).resolve().parents[2] / "README.md"
# values for the refused parameters that a type check alone would not refuse
REFUSED_SAMPLES = {"tool_choice": "required", "parallel_tool_calls": False, "best_of": 3, "suffix": "x"}


def readme_rows() -> list[tuple[str, list[str], str]]:
    text = README.read_text()
    table = text[text.index("<!-- openai-table"):].split("\n\n")[0].splitlines()[3:]
    rows = []
    for line in table:
        endpoint, params, here = (cell.strip() for cell in line.strip("|").split("|"))
        names = [re.split(r"[\[. ]", name)[0] for name in re.findall(r"`([^`]+)`", params)]
        rows.append((endpoint, names, here))
    return rows


def test_readme_table_matches_the_request_models():
    models = {"`POST /v1/chat/completions`": ChatCompletionRequest, "`POST /v1/completions`": CompletionRequest}
    base = {ChatCompletionRequest: {"messages": USER}, CompletionRequest: {"prompt": "x"}}
    checked = 0
    for endpoint, names, here in readme_rows():
        model = models.get(endpoint)
        if model is None or "parts" in here or "token-id" in names or "best_of" in names and "equal" in here:
            continue
        for name in names:
            if here.startswith("supported"):
                assert name in model.model_fields, (endpoint, name)
            elif name not in ("messages", "role"):  # message-level refusals: test_every_unknown_...
                assert here.startswith("400"), here
                refused(model, {**base[model], name: REFUSED_SAMPLES.get(name, {"x": 1})})
            checked += 1
    assert checked > 40


def test_tool_messages_convert_for_the_template_and_calls_parse_back():
    from sage_ray.serve.openai_api import parse_tool_calls

    body = ChatCompletionRequest.model_validate({"messages": USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]})
    assistant, tool = (m.engine_message() for m in body.messages[1:])
    assert assistant["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}  # templates take an object
    assert tool == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    assert body.engine_request()["tools"][0]["function"]["name"] == "get_weather"
    assert "tools" not in ChatCompletionRequest.model_validate(
        {"messages": USER, "tools": body.model_dump()["tools"], "tool_choice": "none"}).engine_request()
    assert "tool_call_id" in refused(ChatCompletionRequest, {"messages": [{"role": "tool", "content": "x"}]})
    assert "content: required" in refused(ChatCompletionRequest, {"messages": [{"role": "user"}]})
    text, calls = parse_tool_calls('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
                                   '{"city": "Paris"}}\n</tool_call><tool_call>not json</tool_call>')
    assert text == "Let me check.\n<tool_call>not json</tool_call>"
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [("get_weather", '{"city": "Paris"}')]
    assert parse_tool_calls("no calls here") == ("no calls here", [])
