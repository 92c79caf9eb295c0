"""The request bodies the router accepts: OpenAI's chat and completions shapes, checked before any worker sees
them, so that bad input is a 400 naming the field instead of an exception in the router or the engine.

Only what the router or the engine could choke on is typed (messages and content parts, prompts, counts,
sampling numbers); every other field passes through to vLLM unchanged (`extra="allow"`), which has its
own checks for the many options it adds. Numbers are bounded by what OpenAI documents, or, where OpenAI
says nothing, by what an engine can hold (token ids and seeds fit their integer types). Non-finite
numbers never get here: the body parser refuses NaN and Infinity anywhere in the body.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

INT64 = 2**63
TOKEN_ID = Annotated[int, Field(ge=0, lt=2**31)]
MAX_TOKENS = 1 << 24  # no engine generates more in one request; vLLM caps by the context length anyway


class Open(BaseModel):
    """A JSON object that may carry fields we do not check (they reach vLLM as sent)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class TextPart(Open):
    type: Literal["text"]
    text: str


class ImageURL(Open):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(Open):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(Open):
    data: str
    format: str


class AudioPart(Open):
    type: Literal["input_audio"]
    input_audio: InputAudio


class RefusalPart(Open):
    type: Literal["refusal"]
    refusal: str


class OtherPart(Open):
    """A part of a kind OpenAI does not define (vLLM adds video_url, audio_url, ...): vLLM checks it."""

    type: str


KNOWN_PARTS = {"text", "image_url", "input_audio", "refusal"}


def _part_kind(v) -> str:
    t = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    return t if isinstance(t, str) and t in KNOWN_PARTS else "other"


ContentPart = Annotated[
    Annotated[TextPart, Tag("text")] | Annotated[ImagePart, Tag("image_url")]
    | Annotated[AudioPart, Tag("input_audio")] | Annotated[RefusalPart, Tag("refusal")]
    | Annotated[OtherPart, Tag("other")],
    Discriminator(_part_kind)]


class FunctionCall(Open):
    name: str
    arguments: str


class ToolCall(Open):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_present(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content or [] if isinstance(p, TextPart))


class StreamOptions(Open):
    include_usage: bool | None = None


Stop = str | Annotated[list[str], Field(max_length=64)] | None


class Sampling(Open):
    """What chat and completions share."""

    model: str = Field(min_length=1, max_length=512)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stop: Stop = None
    user: str | None = None
    cache_salt: str | None = Field(None, min_length=1, max_length=1024)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def prompt_text(self) -> str:
        return "\n".join(m.text() for m in self.messages)


class CompletionRequest(Sampling):
    prompt: (Annotated[str, Field()] | Annotated[list[str], Field(min_length=1)]
             | Annotated[list[TOKEN_ID], Field(min_length=1)]
             | Annotated[list[Annotated[list[TOKEN_ID], Field(min_length=1)]], Field(min_length=1)])
    best_of: int | None = Field(None, ge=1, le=128)
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else json.dumps(self.prompt)
