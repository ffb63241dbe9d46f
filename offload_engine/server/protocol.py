"""OpenAI's request and response shapes for /v1/chat/completions and /v1/completions.

Requests are validated here (types and ranges as OpenAI documents them); parameters the engine cannot honour are
refused with a message, except those OpenAI documents as optional hints (`user`, `store`, `metadata`, ...), which
unknown fields fall under and are ignored. `top_k` and `repetition_penalty` are accepted as extensions (vLLM
has them too).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from ..generate import SamplingParams

# Strict: "0.5" or true is refused, as OpenAI does (a strict float still takes an int).
Temperature = Annotated[float, Field(strict=True, ge=0, le=2)]
Probability = Annotated[float, Field(strict=True, ge=0, le=1)]
Penalty = Annotated[float, Field(strict=True, ge=-2, le=2)]
PositiveInt = Annotated[StrictInt, Field(ge=1)]


MAX_STOP = 4  # stop strings per request, as OpenAI allows


def check_text(value):
    """`value` (a string, a list of strings or of content parts, or None) if all its text is valid Unicode. JSON can
    spell a lone UTF-16 surrogate (\\ud800), which Python keeps in a str but no tokenizer or UTF-8 encoder takes."""
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    for text in (getattr(item, "text", item) for item in items):
        if not isinstance(text, str):
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"the text holds a lone UTF-16 surrogate ({ascii(text[e.start])} at character "
                             f"{e.start}), which is not valid Unicode: send UTF-8 text (a \\u escape in JSON must "
                             f"pair a high surrogate with a low one)") from None
    return value


class UnsupportedParameter(ValueError):
    """A valid OpenAI parameter whose value the engine cannot honour; `param` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: StrictStr
    text: StrictStr | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. `name`: a hint the template has no place for
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[ContentPart], None] = None

    _content_is_unicode = field_validator("content")(check_text)

    def text(self) -> str:
        if isinstance(self.content, list):
            if any(part.type != "text" or part.text is None for part in self.content):
                raise UnsupportedParameter("messages", "only text content parts are supported: this model reads "
                                                       "no images, audio or files")
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class SamplingRequest(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None  # required by OpenAI; here it may be left out, but must not name another model
    max_tokens: PositiveInt | None = None
    temperature: Temperature = 1.0
    top_p: Probability = 1.0
    n: PositiveInt = 1
    stop: Union[StrictStr, list[StrictStr], None] = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, Annotated[float, Field(strict=True)]] | None = None
    user: StrictStr | None = None
    top_k: Annotated[StrictInt, Field(ge=0)] = 0  # extension
    repetition_penalty: Annotated[float, Field(strict=True, gt=0)] = 1.0  # extension

    _text_is_unicode = field_validator("model", "user")(check_text)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop):
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings are allowed, got {len(stop)}")
        if stop == "" or (isinstance(stop, list) and "" in stop):
            raise ValueError("stop strings must be non-empty")
        return check_text(stop)

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def sampling(self, max_new_tokens: int) -> SamplingParams:
        """The engine's sampling parameters; raises UnsupportedParameter for what it cannot do."""
        if self.n != 1:
            raise UnsupportedParameter("n", "n > 1 is not supported: this server generates one choice per request")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise UnsupportedParameter(name, f"{name} is not supported; use repetition_penalty (> 1 discourages "
                                                 f"repeats) or leave {name} at 0")
        if self.logit_bias:
            raise UnsupportedParameter("logit_bias", "logit_bias is not supported: leave it out")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        # top_p 0 keeps only the most likely token: greedy (the engine's top_p must be > 0).
        temperature = 0.0 if self.top_p == 0 else float(self.temperature)
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=float(self.top_p) or 1.0,
                              top_k=self.top_k, repetition_penalty=float(self.repetition_penalty), seed=self.seed,
                              stop=stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(SamplingRequest):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: PositiveInt | None = None  # OpenAI's newer name for max_tokens
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: Union[StrictStr, dict, None] = None

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def sampling(self, max_new_tokens: int) -> SamplingParams:
        if self.logprobs or self.top_logprobs:
            raise UnsupportedParameter("logprobs", "logprobs are not supported: leave logprobs out or false")
        if self.response_format and self.response_format.get("type") != "text":
            raise UnsupportedParameter("response_format", "only response_format {\"type\": \"text\"} is supported")
        if self.tools or self.tool_choice not in (None, "none"):
            raise UnsupportedParameter("tools", "tool calling is not supported: leave tools and tool_choice out")
        return super().sampling(max_new_tokens)

    def chat_messages(self) -> list[dict[str, str]]:
        """Messages for the chat template; OpenAI's `developer` role is the newer name of `system`. Raises
        UnsupportedParameter for non-text content."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(SamplingRequest):
    prompt: Union[StrictStr, Annotated[list[StrictInt], Field(min_length=1)], Annotated[list[StrictStr], Field(
        min_length=1)]]
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None

    _prompt_is_unicode = field_validator("prompt", "suffix")(check_text)

    def sampling(self, max_new_tokens: int) -> SamplingParams:
        if self.logprobs:
            raise UnsupportedParameter("logprobs", "logprobs are not supported: leave logprobs out")
        if self.echo or self.suffix:
            raise UnsupportedParameter("echo" if self.echo else "suffix", "echo and suffix are not supported")
        if self.best_of not in (None, 1):
            raise UnsupportedParameter("best_of", "best_of > 1 is not supported")
        return super().sampling(max_new_tokens)

    def prompt_input(self) -> str | list[int]:
        """The prompt text, or token ids as given (a one-string list is that string)."""
        if isinstance(self.prompt, list) and isinstance(self.prompt[0], str):
            if len(self.prompt) > 1:
                raise UnsupportedParameter("prompt", "one prompt per request: batches of prompts are not supported")
            return self.prompt[0]
        return self.prompt


# ---- responses ----
def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    # Escape what UTF-8 cannot encode (a lone surrogate quoted from a request), or the error could not be sent.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's usage block; `cached_tokens`: prompt tokens whose KV cache was reused (prefix reuse)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def chat_response(id_: str, model: str, text: str, finish_reason: str, usage_: dict) -> dict:
    return {"id": id_, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage_, "system_fingerprint": None}


def chat_chunk(id_: str, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": id_, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            "system_fingerprint": None}


def completion_response(id_: str, model: str, text: str, finish_reason: str | None, usage_: dict | None = None
                        ) -> dict:
    """A whole completion, or (without usage) one streamed chunk of one."""
    body = {"id": id_, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "system_fingerprint": None}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def usage_chunk(id_: str, model: str, object_: str, usage_: dict) -> dict:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    return {"id": id_, "object": object_, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage_}
