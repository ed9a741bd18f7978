"""The OpenAI chat-completions request as pydantic models, and the OpenAI error shape.

Fields the engine honours are typed and range-checked (OpenAI's ranges); fields OpenAI defines that this server
does not implement are refused with a 400 naming the ``param`` (never silently ignored, unlike `transformers
serve`); unknown fields are refused too. ``top_k``, ``repetition_penalty`` and ``ignore_eos`` are extensions (as
vLLM's).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# OpenAI fields that are accepted only at their "off" value: (field, the values that mean off, why).
UNSUPPORTED = {
    "tools": ((None, []), "tool calls are not supported"),
    "tool_choice": ((None, "none"), "tool calls are not supported"),
    "functions": ((None, []), "function calls are not supported"),
    "function_call": ((None, "none"), "function calls are not supported"),
    "parallel_tool_calls": ((None,), "tool calls are not supported"),
    "response_format": ((None, {"type": "text"}), "only plain text replies are supported"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "frequency_penalty": ((None, 0, 0.0), "use repetition_penalty (an extension field) instead"),
    "presence_penalty": ((None, 0, 0.0), "use repetition_penalty (an extension field) instead"),
    "audio": ((None,), "audio is not supported"),
    "modalities": ((None, ["text"]), "only text is supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "reasoning_effort": ((None,), "this model does not reason"),
    "service_tier": ((None, "auto", "default"), "there is one service tier"),
    "store": ((None, False), "the server decides what is stored (chatrlhf serve --feedback-db), not the request"),
    "metadata": ((None, {}), "metadata is not stored (chatrlhf serve --feedback-db stores the completion itself)"),
    "web_search_options": ((None,), "web search is not supported"),
}


class APIError(Exception):
    """An error the client gets as ``{"error": {"message", "type", "param", "code"}}`` with HTTP ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(self.status, kind)
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


def validation_error(errors: list[dict]) -> APIError:
    """pydantic's (or FastAPI's) list of errors as one 400 naming the first bad field."""
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if e.get("type") == "extra_forbidden":
        return APIError(400, f"unknown field '{param}': this server does not know it (see docs/serve.md for the "
                        "fields it takes)", param, "unknown_parameter")
    if e.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", None, "invalid_json")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return APIError(400, f"{param or 'body'}: {e.get('msg', 'invalid')}{more}", param, "invalid_value")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """POST /v1/chat/completions. Sampling fields left None take the server's defaults (its decoding flags)."""
    model_config = ConfigDict(extra="forbid")
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)                          # extension (vLLM)
    repetition_penalty: float | None = Field(None, gt=0, le=10)    # extension (vLLM)
    ignore_eos: bool = False                                       # extension (vLLM): every reply max_tokens long
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    user: str | None = Field(None, max_length=256)                 # an end-user id; recorded nowhere yet
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None
    logit_bias: dict | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    audio: dict | None = None
    modalities: list[str] | None = None
    prediction: dict | None = None
    reasoning_effort: str | None = None
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict | None = None
    web_search_options: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def check(self) -> None:
        """The rules between fields, and the OpenAI fields this server does not implement (400 naming them)."""
        for name, (off, why) in UNSUPPORTED.items():
            if getattr(self, name) not in off:
                raise APIError(400, f"'{name}' is not supported by this server: {why}", name, "unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options needs stream: true", "stream_options", "invalid_value")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
        if self.top_logprobs:
            raise APIError(400, "top_logprobs > 0 is not supported yet: logprobs gives each chosen token's log-prob",
                           "top_logprobs", "unsupported_parameter")
        if self.logprobs and self.stream:
            raise APIError(400, "logprobs with stream: true is not supported yet: ask without streaming",
                           "logprobs", "unsupported_parameter")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens disagree: give one", "max_tokens",
                           "invalid_value")
