"""Request and response models of the HTTP API (OpenAI-compatible routes and the simple API).

Fields OpenAI clients may send but this server does not implement are accepted
when left at their defaults and refused with a 400 naming the field otherwise;
unknown fields are ignored, as OpenAI-compatible servers commonly do.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loradex.serving.errors import BadRequest


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = Field(None, description="base name (no adapter), NAME, NAME@VERSION or NAME@ALIAS")
    adapter: Optional[str] = Field(None, description="adapter reference; wins over model")
    max_tokens: Optional[int] = Field(None, ge=1, description="new tokens at most")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # vLLM's sampling extras, for fixed-length runs (benchmarks): EOS suppressed until min_tokens; ignore_eos
    # generates until max_tokens (or a stop string)
    min_tokens: int = Field(0, ge=0, description="no end-of-sequence before this many tokens (vLLM extra)")
    ignore_eos: bool = Field(False, description="do not stop at end-of-sequence (vLLM extra)")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def refuse_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise BadRequest(f"{name} is not supported by this server; leave it at 0", param=name)
        if self.logit_bias:
            raise BadRequest("logit_bias is not supported by this server", param="logit_bias")


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def prompts(self) -> list[Union[str, list[int]]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise BadRequest("echo is not supported by this server", param="echo")
        if self.logprobs is not None:
            raise BadRequest("logprobs is not supported by this server", param="logprobs")
        if self.best_of not in (None, 1):
            raise BadRequest("best_of is not supported by this server", param="best_of")
        if self.suffix:
            raise BadRequest("suffix is not supported by this server", param="suffix")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text":
                raise BadRequest(f"message content of type {part.type!r} is not supported (text only)", param="messages")
            parts.append(part.text or "")
        return "".join(parts)


class ChatRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    tools: Optional[list[Any]] = None
    logprobs: Optional[bool] = None

    def template_messages(self) -> list[dict]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise BadRequest("tools are not supported by this server", param="tools")
        if self.logprobs:
            raise BadRequest("logprobs is not supported by this server", param="logprobs")


class GenerateRequest(BaseModel):
    """POST /generate: the simple API (greedy by default)."""

    model_config = ConfigDict(extra="forbid")

    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    adapter: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False

    @field_validator("messages")
    @classmethod
    def _non_empty(cls, v):
        if v is not None and not v:
            raise ValueError("messages must not be empty")
        return v


class RegisterRequest(BaseModel):
    """POST /adapters with a JSON body: register a folder on the server's machine."""

    model_config = ConfigDict(extra="forbid")

    path: str
    name: str
    base: Optional[str] = None
    description: Optional[str] = None
    allow_noop: bool = False


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Optional[str]


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    logprobs: None = None
    finish_reason: Optional[str]


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class GenerateResponse(BaseModel):
    """POST /generate's answer."""

    text: str
    adapter: Optional[str] = Field(None, description="NAME@VERSION that served it; null for the base or a merged model")
    model: str
    path: Literal["base", "adapter", "merged"]
    finish_reason: str
    usage: Usage


class Health(BaseModel):
    """GET /health: the process answers (the model may still be loading)."""

    status: Literal["ok"] = "ok"


class LoadedAdapter(BaseModel):
    adapter: str
    version: int
    slot: int
    users: int = Field(description="rows in the running batch using it")
    pinned: bool


class Ready(BaseModel):
    """GET /ready: the engine is serving, and what it holds."""

    ready: Literal[True] = True
    base: str
    quantize: str
    device: str
    active: int = Field(description="rows in the running batch")
    waiting: int = Field(description="requests waiting for a batch slot")
    context: int = Field(description="context length in tokens")
    loaded_adapters: list[LoadedAdapter]
    lora_bank_bytes: int
    merged_models: list[str] = Field(description="merged models loaded for --route-merged")
    kernels: Optional[dict] = Field(None, description="the Linear kernel chosen at load on this machine, and why")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loradex"
    root: str
    parent: Optional[str] = None
    # loradex's additions (OpenAI clients ignore them): which version a name serves, and its score
    # under the configuration this server runs, or a note saying there is none
    version: Optional[int] = None
    served_as: Optional[str] = None
    score: Optional[dict] = None
    score_note: Optional[str] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
