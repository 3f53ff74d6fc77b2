"""The request bodies of the OpenAI API routes, validated before anything runs.

Every field OpenAI defines is either honoured or refused: the models forbid unknown fields,
so a client that asks for something this server does not do (audio, tools, `suffix`...) gets
a 400 naming the field instead of an answer that quietly ignores it. A field sent as `null`
counts as not sent, as in OpenAI's API.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 8  # choices per request: each is one more engine request
MAX_STOP = 4  # OpenAI's bound
MAX_PROMPTS = 16  # prompts of one /v1/completions request
MAX_TOKENS = 8192
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, values: Any) -> Any:
        return {k: v for k, v in values.items() if v is not None} if isinstance(values, dict) else values


class StreamOptions(Strict):
    include_usage: bool = False


class JsonSchemaFormat(Strict):
    name: str = Field(..., min_length=1, max_length=64)
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    description: str | None = None
    strict: bool | None = None  # the schema is always enforced strictly here


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_for_its_type(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("give json_schema exactly when type is 'json_schema'")
        return self

    def target_schema(self) -> dict[str, Any] | None:
        """The JSON schema the reply must match; None for free text."""
        from sage_ray.serve.engines.grammar import ANY_OBJECT

        if self.type == "text":
            return None
        return self.json_schema.schema_ if self.json_schema else ANY_OBJECT


class Sampling(Strict):
    """The decoding fields shared by /v1/chat/completions and /v1/completions."""

    model: str | None = Field(None, description="A registered model or adapter; empty = the active model.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N, description=f"Choices to generate (at most {MAX_N}).")
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(None, description="An end-user id, as in OpenAI's API; it does not change the reply.")

    @field_validator("model")
    @classmethod
    def _default_model(cls, value: str | None) -> str | None:
        return None if value in (None, "", "default", "active") else value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None and len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.isdigit():
                raise ValueError(f"keys are token ids (digits), got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"token {token}: the bias must be in [-100, 100], got {bias}")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "Sampling":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream: true")
        return self

    def engine_params(self, max_tokens: int | None) -> dict[str, Any]:
        """The LLMServer request fields (SamplingParams) for one choice; unset ones are left out."""
        values = {"max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p, "stop": self.stop,
                  "seed": self.seed, "presence_penalty": self.presence_penalty,
                  "frequency_penalty": self.frequency_penalty,
                  "logit_bias": {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None}
        return {k: v for k, v in values.items() if v is not None}


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str  # a JSON object as text, as OpenAI sends it


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] = ""
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, value: str | list[dict[str, Any]]) -> str:
        if isinstance(value, str):
            return value
        texts = []
        for i, part in enumerate(value):
            kind = part.get("type")
            if kind != "text":
                raise ValueError(f"part {i} is {kind!r}: only text parts are supported (the served models "
                                 "read text only)")
            texts.append(TextPart.model_validate(part).text)
        return "".join(texts)  # OpenAI joins text parts with nothing between them

    @model_validator(mode="after")
    def _tool_fields(self) -> "ChatMessage":
        if "content" not in self.model_fields_set and not self.tool_calls:
            raise ValueError("content: required (only an assistant message with tool_calls may leave it out)")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls: only an assistant message carries them")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool_call_id: give it exactly on role 'tool' messages (the call it answers)")
        return self

    def engine_message(self) -> dict[str, Any]:
        # "developer" is OpenAI's newer name for the system message
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": self.content}
        if self.tool_calls:  # chat templates take the arguments as an object, OpenAI sends them as text
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _json_object(c.function.arguments)}} for c in self.tool_calls]
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        return message


def _json_object(text: str) -> dict[str, Any]:
    import json

    try:
        value = json.loads(text)
    except ValueError as err:
        raise ValueError(f"tool_calls: arguments is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise ValueError("tool_calls: arguments must be a JSON object")
    return value


class FunctionDef(Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=64)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        if self.tool_choice not in (None, "none", "auto"):
            raise ValueError("tool_choice: only 'auto' and 'none' are supported (the model decides whether to "
                             "call a tool; forcing a call is not implemented)")
        if self.tools and self.stream:
            raise ValueError("tools: not supported with stream: true (tool calls are parsed from the whole "
                             "reply); send stream: false")
        if self.parallel_tool_calls is False:
            raise ValueError("parallel_tool_calls: false is not supported; every call the model makes is returned")
        schema = self.response_format.target_schema() if self.response_format else None
        if schema is not None:
            from sage_ray.serve.engines.grammar import GrammarError, json_grammar

            try:
                json_grammar(schema)
            except GrammarError as err:  # names what in the schema cannot be enforced
                raise ValueError(str(err)) from None
        return self

    def engine_request(self) -> dict[str, Any]:
        params = self.engine_params(self.max_completion_tokens or self.max_tokens)
        if self.logprobs:
            params.update(logprobs=True, top_logprobs=self.top_logprobs or 0)
        if self.response_format and self.response_format.target_schema() is not None:
            params["json_schema"] = self.response_format.target_schema()
        if self.tools_offered:
            params["tools"] = [t.model_dump(exclude_none=True) for t in self.tools]
        return params

    @property
    def tools_offered(self) -> bool:
        """Tools go into the prompt (tool_choice 'none': the model is not shown them)."""
        return bool(self.tools) and self.tool_choice != "none"


class CompletionRequest(Sampling):
    prompt: str | list[str] = Field(..., description="A text, or a list of texts (one choice set each).")
    max_tokens: int = Field(DEFAULT_COMPLETION_TOKENS, ge=1, le=MAX_TOKENS)
    logprobs: int | None = Field(None, ge=0, le=5, description="Also the N most likely tokens at each position.")
    echo: bool = False
    best_of: int | None = Field(None, ge=1)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, value: Any) -> Any:
        prompts = [value] if isinstance(value, str) else value
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("send a text or a list of texts (token-id prompts are not supported)")
        if not prompts or len(prompts) > MAX_PROMPTS:
            raise ValueError(f"send 1 to {MAX_PROMPTS} prompts")
        if not all(prompts):
            raise ValueError("a prompt is empty")
        return value

    @model_validator(mode="after")
    def _check(self) -> "CompletionRequest":
        if self.best_of not in (None, self.n):
            raise ValueError("best_of: only best_of == n is supported (no server-side ranking)")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt

    def engine_request(self) -> dict[str, Any]:
        params = self.engine_params(self.max_tokens)
        if self.logprobs is not None:
            params.update(logprobs=True, top_logprobs=self.logprobs)
        return params
