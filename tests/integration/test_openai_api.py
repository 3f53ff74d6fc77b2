"""The OpenAI API of a real Studio, driven by the real `openai` client: chat completions with
every parameter the server honours, /v1/completions, and clear 400s for what it does not do.

One Studio (the tiny model, config-deployed as `sage studio start` does) serves the module.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.ray_cluster import free_port

pytestmark = pytest.mark.ray
MODEL = "tiny-qwen2"
ANSWER = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                           "confidence": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["answer", "confidence"], "additionalProperties": False}
HI = [{"role": "user", "content": [{"type": "text", "text": "Is Paris in France? "},
                                   {"type": "text", "text": "Answer briefly."}]}]


@pytest.fixture(scope="module")
def studio(ray_cluster):
    from ray import serve

    from sage_ray.serve.deploy import deploy_studio
    from sage_ray.serve.settings import StudioSettings

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        deploy_studio(StudioSettings(sage_home=str(ray_cluster.sage_home), model="tiny", engine="hf", ui=False),
                      port=port, timeout_s=300)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def client(studio):
    from openai import OpenAI

    with OpenAI(base_url=f"{studio}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def test_chat_n_logprobs_seed_penalties_and_text_parts(client):
    reply = client.chat.completions.create(model=MODEL, messages=HI, n=3, temperature=1.0, seed=5,
                                           max_completion_tokens=6, logprobs=True, top_logprobs=2,
                                           presence_penalty=0.5, frequency_penalty=0.5, user="user-42")
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) > 1  # seed + i per choice: three different samples
    for choice in reply.choices:
        tokens = choice.logprobs.content
        assert bytes(b for t in tokens for b in t.bytes).decode(errors="replace") == choice.message.content
        assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in tokens)
    assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices)
    again = client.chat.completions.create(model=MODEL, messages=HI, n=3, temperature=1.0, seed=5,
                                           max_completion_tokens=6, presence_penalty=0.5, frequency_penalty=0.5)
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]


def test_chat_stop_and_max_tokens(client):
    full = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_tokens=24).choices[0]
    assert full.finish_reason == "length"
    stop = full.message.content[8:11]
    cut = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_tokens=24, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == full.message.content[:full.message.content.index(stop)]


def test_chat_json_schema_and_json_object(client):
    import jsonschema

    reply = client.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=40, n=2, temperature=1.0, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}})
    for choice in reply.choices:
        jsonschema.validate(json.loads(choice.message.content), ANSWER)
    obj = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=20, temperature=0,
                                         response_format={"type": "json_object"})
    assert obj.choices[0].message.content.startswith("{")


def test_chat_streaming_n_with_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=HI, n=2, max_tokens=5, temperature=0.8, seed=3, stream=True,
                                            stream_options={"include_usage": True}, logprobs=True)
    chunks = list(stream)
    texts = {0: "", 1: ""}
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert all(texts.values())
    assert {c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason} == {"length"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    whole = client.chat.completions.create(model=MODEL, messages=HI, n=2, max_tokens=5, temperature=0.8, seed=3)
    assert [c.message.content for c in whole.choices] == [texts[0], texts[1]]


def test_completions_plain_streamed_echo_and_logprobs(client):
    reply = client.completions.create(model=MODEL, prompt=["The capital of France is", "Once upon"],
                                      max_tokens=4, temperature=0, logprobs=2, n=2, seed=9)
    assert len(reply.choices) == 4 and reply.object == "text_completion"
    assert reply.choices[0].text == reply.choices[1].text  # greedy: the same for both choices of a prompt
    assert reply.choices[0].text != reply.choices[2].text
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == 4 and all(lp <= 0 for lp in logprobs.token_logprobs)
    assert max(logprobs.top_logprobs[0].values()) == logprobs.token_logprobs[0]  # greedy: the likeliest token
    assert logprobs.text_offset[0] == 0
    echoed = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == "The capital of France is" + reply.choices[0].text
    streamed = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "The capital of France is"}],
                                          max_tokens=1, temperature=0)
    assert chat.usage.prompt_tokens > reply.usage.prompt_tokens / 2  # a chat template wraps the chat prompt


def test_what_is_not_supported_is_refused_with_400_naming_it(client, studio):
    import openai

    cases = [
        ({"tools": WEATHER, "tool_choice": "required"}, "tool_choice"),
        ({"tools": WEATHER, "stream": True}, "stream"),
        ({"extra_body": {"audio": {"voice": "alloy", "format": "wav"}}}, "audio"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
         "Unimplemented keys"),
        ({"n": 99}, "n"),
    ]
    for extra, named in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, **extra)
        assert named in err.value.message, (extra, err.value.message)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}])
    assert "only text parts" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", suffix="y")
    assert "suffix" in err.value.message
    raw = httpx.post(f"{studio}/v1/chat/completions", json={"messages": HI, "functions": [{"name": "f"}]}, timeout=30)
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "functions"


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
PLAIN_TEMPLATE = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                  "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def test_tools_go_through_the_models_own_template(client, ray_cluster):
    import openai
    import ray
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sage_ray.models import resolve_model
    from sage_ray.registry import get_registry

    history = HI + [{"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    plain = client.chat.completions.create(model=MODEL, messages=history, max_tokens=2, temperature=0)
    offered = client.chat.completions.create(model=MODEL, messages=history, tools=WEATHER, tool_choice="auto",
                                             max_tokens=2, temperature=0)
    hidden = client.chat.completions.create(model=MODEL, messages=history, tools=WEATHER, tool_choice="none",
                                            max_tokens=2, temperature=0)
    assert offered.usage.prompt_tokens > plain.usage.prompt_tokens + 20  # the definitions are in the prompt
    assert hidden.usage.prompt_tokens == plain.usage.prompt_tokens
    assert offered.choices[0].finish_reason in ("length", "stop")  # the random model calls nothing
    # an adapter carries its own tokenizer, so its template serves it: one without tools is refused
    base = resolve_model("tiny", progress=False)
    folder = ray_cluster.sage_home / "adapters" / "tiny-no-tools"
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules="all-linear")
                   ).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = PLAIN_TEMPLATE
    tokenizer.save_pretrained(folder)
    ray.get(get_registry(ray_cluster.sage_home).upsert_artifact.remote(
        {"name": "tiny-no-tools", "kind": "lora", "path": str(folder), "base_model": "tiny"}))
    assert client.chat.completions.create(model="tiny-no-tools", messages=HI, max_tokens=2).choices
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-no-tools", messages=HI, tools=WEATHER, max_tokens=2)
    assert "does not render tools" in err.value.message


# ---- the fine-tuning API -------------------------------------------------------------------
def openai_jsonl(chat_data, records: int, skip: int = 0) -> bytes:
    """The shipped chat conversations in OpenAI's fine-tuning format: one {"messages": [...]} per line."""
    conversations = json.loads(chat_data.read_text())[skip:skip + records]
    return "".join(json.dumps({"messages": c["messages"]}) + "\n" for c in conversations).encode()


def openai_dpo_jsonl(chat_data, records: int) -> bytes:
    """OpenAI's DPO format from the shipped conversations: the real reply is preferred, the reply
    to the next conversation (off topic here) is not."""
    conversations = json.loads(chat_data.read_text())[:records + 1]
    lines = [{"input": {"messages": c["messages"][:-1]}, "preferred_output": [c["messages"][-1]],
              "non_preferred_output": [{"role": "assistant", "content": n["messages"][-1]["content"]}]}
             for c, n in zip(conversations, conversations[1:])]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def wait_for(client, job_id: str, statuses: set[str], timeout_s: float = 300):
    import time

    deadline = time.monotonic() + timeout_s
    while (job := client.fine_tuning.jobs.retrieve(job_id)).status not in statuses:
        assert time.monotonic() < deadline, job
        time.sleep(1)
    return job


def create_when_ready(client, **kwargs):
    """jobs.create, retried while Ray's job agent is still starting on a fresh cluster."""
    import time

    import openai

    deadline = time.monotonic() + 60
    while True:
        try:
            return client.fine_tuning.jobs.create(**kwargs)
        except openai.APIStatusError as err:
            if "try again later" not in err.message or time.monotonic() > deadline:
                raise
            time.sleep(2)


def test_files_are_validated_at_upload(client, chat_data):
    import openai

    data = openai_jsonl(chat_data, 8)
    uploaded = client.files.create(file=("../my train set.jsonl", data), purpose="fine-tune")
    assert uploaded.filename == "my_train_set.jsonl" and uploaded.bytes == len(data)
    assert client.files.retrieve(uploaded.id).id == uploaded.id
    assert uploaded.id in {f.id for f in client.files.list(purpose="fine-tune")}
    assert client.files.content(uploaded.id).content == data
    bad = data + b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}\n'
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    assert "line 9" in err.value.message and "content" in err.value.message, err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("x.jsonl", data), purpose="assistants")
    assert "purpose" in err.value.message
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_fine_tune_job_runs_and_its_model_answers_at_once(client, studio, chat_data):
    import openai

    training = client.files.create(file=("train.jsonl", openai_jsonl(chat_data, 8)), purpose="fine-tune")
    for bad, named in (({"method": {"type": "reinforcement"}}, "reinforcement"),
                       ({"validation_file": "file-000000000000000000000000"}, "validation_file"),
                       ({"hyperparameters": {"n_epochs": 0}}, "n_epochs"),
                       ({"training_file": "file-000000000000000000000000"}, "training_file"),
                       ({"extra_body": {"integrations": [{"type": "wandb"}]}}, "integrations")):
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.jobs.create(**{"model": "tiny", "training_file": training.id, **bad})
        assert named in err.value.message, (bad, err.value.message)
    held_out = client.files.create(file=("valid.jsonl", openai_jsonl(chat_data, 3, skip=8)), purpose="fine-tune")
    job = create_when_ready(client, model="tiny", training_file=training.id, suffix="breakfast", seed=7,
                            validation_file=held_out.id,
                            method={"type": "supervised", "supervised": {"hyperparameters": {
                                "n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 2}}})
    assert job.status == "queued" and job.id.startswith("breakfast-") and job.training_file == training.id
    assert job.validation_file == held_out.id
    assert job.hyperparameters.batch_size == 2 and job.hyperparameters.learning_rate_multiplier == 2
    assert job.id in {j.id for j in client.fine_tuning.jobs.list()}
    # a DPO job waits in the queue behind the first: pause it, resume it, cancel it
    pairs = client.files.create(file=("pairs.jsonl", openai_dpo_jsonl(chat_data, 6)), purpose="fine-tune")
    second = create_when_ready(client, model="tiny", training_file=pairs.id,
                               method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "batch_size": 2}}})
    assert second.method.type == "dpo" and second.method.dpo.hyperparameters.beta == 0.2
    assert httpx.get(f"{studio}/api/finetune/tasks/{second.id}", timeout=30).json()["config"]["method"] == "dpo"
    assert client.fine_tuning.jobs.pause(second.id).status == "paused"
    assert client.fine_tuning.jobs.resume(second.id).status in ("queued", "running")
    assert client.fine_tuning.jobs.cancel(second.id).status == "cancelled"
    done = wait_for(client, job.id, {"succeeded", "failed", "cancelled"})
    assert done.status == "succeeded", done
    assert httpx.get(f"{studio}/api/finetune/tasks/{job.id}", timeout=30).json()["status"] == "completed"
    reply = client.chat.completions.create(model=done.fine_tuned_model, messages=HI, max_tokens=4)
    assert reply.model == done.fine_tuned_model and reply.choices[0].message.content
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=5))  # pages through every event
    assert events[-1].message == f"Created fine-tuning job: {job.id}"
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and all(e.data["loss"] > 0 for e in metrics if "loss" in e.data)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.fine_tuned_model_checkpoint for c in checkpoints] == [done.fine_tuned_model]
    assert checkpoints[0].step_number > 0 and checkpoints[0].metrics.full_valid_loss > 0  # the held-out file's loss
    assert 0 < checkpoints[0].metrics.full_valid_mean_token_accuracy <= 1
