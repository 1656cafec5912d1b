"""OpenAI-compatible request bodies (pydantic) and their mapping onto `SamplingParams`.

Unknown fields are ignored (clients send many optional ones); the fields we take are
validated here or by `SamplingParams`, and every error names its field (`param`). Fields that
change what a client gets back and that we do not implement yet (tools, structured outputs, a
request-supplied chat template) are rejected with a 400 naming the field, never silently ignored.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from raylight.cluster.openai_outputs import Shape
from raylight.cluster.structured_api import STRUCTURED_FIELDS, structured_outputs_of
from raylight.cluster.structured_api import check_field as check_structured
from raylight.cluster.tool_parsers import check_tools, tool_grammar
from raylight.sampling_params import SamplingParams


class APIError(Exception):
    """An error with OpenAI's shape and an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """Every error response of the server (OpenAI's shape)."""
    error: ErrorDetail


def _unsupported(field: str, value: Any, allowed: tuple = (None,)) -> Any:
    if value in allowed or (isinstance(value, (list, dict)) and not value and None in allowed):
        return value
    raise ValueError(f"{field} is not supported by this server yet")


# Stop strings are matched against every new token's text: a bounded list keeps that cheap.
MAX_STOPS = 64
MAX_STOP_CHARS = 1024

# vLLM's request extensions that we do not implement, each with the values that change nothing (accepted);
# any other value is a 400 naming the field, never silently ignored.
_VLLM_NOT_IMPLEMENTED: dict[str, tuple] = {
    "bad_words": (None, False), "prompt_embeds": (None, False), "logits_processors": (None, False),
    "use_beam_search": (None, False), "mm_processor_kwargs": (None, False), "media_io_kwargs": (None, False),
    "length_penalty": (None, 1.0), "spaces_between_special_tokens": (None, True), "logprob_token_ids": (None,),
    "priority": (None, 0), "session_id": (None,), "kv_transfer_params": (None,), "ec_transfer_params": (None,),
    "vllm_xargs": (None,), "repetition_detection": (None,), "thinking_token_budget": (None, -1),
    "stream_interval": (None, 1), "watermarking": (None, False), "routed_experts_prompt_start": (None, 0),
    "return_token_offsets": (None, False), "return_mm_kwargs": (None, True),
}

# Output constraints (OpenAI's response_format, vLLM's structured_outputs and guided_* fields): checked here,
# compiled by the engine replica (raylight/cluster/structured_api.py, raylight/structured/).
_STRUCTURED = STRUCTURED_FIELDS


# Strict types: JSON `true` is not the integer 1, "5" is not 5 (a float field still takes an integer).
class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: Optional[str] = None
    n: int = 1
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stop: Union[None, str, list[str]] = None
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # vLLM extensions
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    cache_salt: Optional[str] = None
    request_id: Optional[str] = None
    # structured outputs (one of them)
    response_format: Optional[Any] = None
    guided_json: Optional[Any] = None
    guided_regex: Optional[Any] = None
    guided_choice: Optional[Any] = None
    guided_grammar: Optional[Any] = None
    structured_outputs: Optional[Any] = None
    # vLLM extensions (the README's endpoint list says what each does)
    allowed_token_ids: Optional[list[int]] = None
    prompt_logprobs: Optional[int] = None
    truncate_prompt_tokens: Optional[int] = None
    truncation_side: Optional[Literal["left", "right"]] = None
    return_token_ids: Optional[bool] = None
    return_tokens_as_token_ids: Optional[bool] = None
    # vLLM extensions we do not implement (_VLLM_NOT_IMPLEMENTED): a 400 naming the field unless a no-op value
    bad_words: Optional[Any] = None
    prompt_embeds: Optional[Any] = None
    logits_processors: Optional[Any] = None
    use_beam_search: Optional[Any] = None
    mm_processor_kwargs: Optional[Any] = None
    media_io_kwargs: Optional[Any] = None
    length_penalty: Optional[Any] = None
    spaces_between_special_tokens: Optional[Any] = None
    logprob_token_ids: Optional[Any] = None
    priority: Optional[Any] = None
    session_id: Optional[Any] = None
    kv_transfer_params: Optional[Any] = None
    ec_transfer_params: Optional[Any] = None
    vllm_xargs: Optional[Any] = None
    repetition_detection: Optional[Any] = None
    thinking_token_budget: Optional[Any] = None
    stream_interval: Optional[Any] = None
    watermarking: Optional[Any] = None
    routed_experts_prompt_start: Optional[Any] = None
    return_token_offsets: Optional[Any] = None
    return_mm_kwargs: Optional[Any] = None

    @field_validator(*_VLLM_NOT_IMPLEMENTED, mode="before")
    @classmethod
    def _no_vllm_extension(cls, value, info):
        return _unsupported(info.field_name, value, _VLLM_NOT_IMPLEMENTED[info.field_name])

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_a_stream(cls, value, info):
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream=true")
        return value

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncation(cls, value):
        if value is not None and value != -1 and value < 1:
            raise ValueError("truncate_prompt_tokens must be -1 (the context window) or an integer >= 1")
        return value

    def truncate(self, ids: list[int], max_model_len: int, explicit_max: Optional[int]) -> list[int]:
        """The prompt as truncate_prompt_tokens cuts it: its last k tokens (vLLM's default side; `truncation_side`
        "right" keeps the first k); -1 keeps as many as fit before max_tokens (at least one token of room)."""
        k = self.truncate_prompt_tokens
        if k is None:
            return ids
        if k == -1:
            k = max(1, max_model_len - max(explicit_max or 1, 1))
        if len(ids) <= k:
            return ids
        return ids[:k] if self.truncation_side == "right" else ids[len(ids) - k:]

    def _usage_shape(self) -> dict[str, bool]:
        opts = self.stream_options
        include = bool(opts and opts.include_usage)
        return {"include_usage": include, "continuous_usage": include and bool(opts.continuous_usage_stats)}

    @field_validator("stop", "stop_token_ids")
    @classmethod
    def _bounded_stops(cls, value, info):
        if isinstance(value, list) and len(value) > MAX_STOPS:
            raise ValueError(f"{info.field_name} takes at most {MAX_STOPS} entries, got {len(value)}")
        if isinstance(value, list) and any(isinstance(v, str) and len(v) > MAX_STOP_CHARS for v in value):
            raise ValueError(f"{info.field_name}: a stop string is longer than {MAX_STOP_CHARS} characters")
        return value

    @field_validator(*_STRUCTURED, mode="before")
    @classmethod
    def _structured_outputs(cls, value, info):
        return check_structured(info.field_name, value)

    def _sampling_params(self, max_tokens: Optional[int], logprobs: Optional[int], default_max: int,
                         prompt_logprobs: Optional[int] = None) -> SamplingParams:
        if self.prompt_logprobs is not None and self.stream:
            raise APIError(400, "prompt_logprobs are not returned in streams (stream=true)", param="prompt_logprobs")
        bias = None
        if self.logit_bias:
            try:
                bias = {int(k): v for k, v in self.logit_bias.items()}
            except ValueError:
                raise APIError(400, "logit_bias keys must be token ids", param="logit_bias") from None
        kwargs = dict(
            n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k, min_p=self.min_p,
            seed=self.seed, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logit_bias=bias, stop=self.stop,
            stop_token_ids=self.stop_token_ids or [], include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos, max_tokens=default_max if max_tokens is None else max_tokens,
            min_tokens=self.min_tokens, logprobs=logprobs, skip_special_tokens=self.skip_special_tokens,
            allowed_token_ids=self.allowed_token_ids,
            prompt_logprobs=self.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
        )
        try:
            kwargs["structured_outputs"] = structured_outputs_of(self)
        except ValueError as e:
            raise APIError(400, str(e), param=param_of(str(e))) from None
        return to_sampling_params(kwargs)


def to_sampling_params(kwargs: dict[str, Any]) -> SamplingParams:
    """SamplingParams(**kwargs), with its ValueError turned into a 400 naming the field."""
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        raise APIError(400, str(e), param=param_of(str(e))) from None


def param_of(message: str) -> Optional[str]:
    """The field a validation message is about: our messages start with the field's name."""
    head = message.split(" ", 1)[0].rstrip(":")
    known = set(SamplingParams.__dataclass_fields__) | {"prompt", "messages", "max_tokens", "max_completion_tokens"}
    known |= {*_STRUCTURED, "tools", "tool_choice"}
    head = head.split(".", 1)[0]  # "tools.0.function.name" -> tools
    if head in known:
        return head
    return "prompt" if message.startswith("prompt") else None


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = None
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None
    add_special_tokens: bool = True  # vLLM: False tokenizes a text prompt without BOS and the like

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: the prompt (and its logprobs) and nothing generated, as log-likelihood
        scoring asks; the engine generates one token that is not returned."""
        return self.echo and self.max_tokens == 0

    def sampling_params(self, default_max: int) -> SamplingParams:
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of must equal n (beam-style best_of is not supported)", param="best_of")
        prompt_logprobs = None
        if self.echo and self.logprobs is not None:  # the echoed prompt's logprobs, as many alternatives
            prompt_logprobs = max(self.prompt_logprobs or 0, self.logprobs)
        return self._sampling_params(1 if self.echo_only else self.max_tokens, self.logprobs, default_max,
                                     prompt_logprobs)

    def response_shape(self) -> Shape:
        return Shape(num_logprobs=self.logprobs, prompt_logprobs=self.prompt_logprobs, echo=self.echo,
                     echo_only=self.echo_only, token_ids=bool(self.return_token_ids),
                     as_token_ids=bool(self.return_tokens_as_token_ids), **self._usage_shape())

    def prompts(self) -> list[Union[str, list[int]]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt is empty", param="prompt")
        if all(isinstance(t, int) for t in p):
            return [p]  # one prompt of token ids
        return list(p)


_CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

# chat_template_kwargs a caller may not set: they change how the template is called, not what it
# renders (CVE-2025-62426: `tokenize`, `chat_template`... overrides).
_RESERVED_TEMPLATE_KWARGS = frozenset((
    "tokenize", "chat_template", "add_generation_prompt", "continue_final_message", "conversation", "messages",
    "tools", "documents", "return_dict", "return_tensors", "return_assistant_tokens_mask", "padding", "truncation",
    "max_length", "tokenizer_kwargs", "processor_kwargs"))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal[_CHAT_ROLES]
    content: Union[None, str, list[dict[str, Any]]] = None
    name: Optional[str] = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    add_generation_prompt: bool = True
    chat_template_kwargs: Optional[dict[str, Union[None, bool, int, float, str]]] = None
    # vLLM extensions: the reply continues the final message (its content echoed before the reply)
    echo: bool = False
    continue_final_message: bool = False
    include_reasoning: bool = True  # no reasoning parser: there is no reasoning to include or hide
    add_special_tokens: Optional[Any] = None  # the template adds them: True is not implemented (400)
    documents: Optional[Any] = None
    return_prompt_text: Optional[Any] = None
    # tool calling (raylight/cluster/tool_parsers.py)
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None
    # not implemented yet: rejected (400 naming the field) unless absent or a no-op
    functions: Optional[Any] = None
    function_call: Optional[Any] = None
    chat_template: Optional[Any] = None
    audio: Optional[Any] = None
    prediction: Optional[Any] = None
    modalities: Optional[Any] = None

    @field_validator("functions", "chat_template", "audio", "prediction", "documents", mode="before")
    @classmethod
    def _not_implemented(cls, value, info):
        return _unsupported(info.field_name, value)

    @field_validator("add_special_tokens", "return_prompt_text", mode="before")
    @classmethod
    def _off_only(cls, value, info):
        return _unsupported(info.field_name, value, (None, False))

    @field_validator("continue_final_message")
    @classmethod
    def _continue_without_generation_prompt(cls, value, info):
        if value and info.data.get("add_generation_prompt", True):
            raise ValueError("continue_final_message needs add_generation_prompt=false (the reply continues the "
                             "final message instead of starting a new one)")
        return value

    def template_kwargs(self) -> Optional[dict[str, Any]]:
        """chat_template_kwargs, plus continue_final_message (which a caller may set only as a field)."""
        if not self.continue_final_message:
            return self.chat_template_kwargs
        return {**(self.chat_template_kwargs or {}), "continue_final_message": True}

    def response_shape(self) -> Shape:
        role = "assistant" if self.add_generation_prompt else self.messages[-1].role
        prefix = ""
        if self.echo:  # vLLM: the final message's content, when the reply has its role
            last = self.conversation()[-1]
            prefix = last["content"] if last["role"] == role else ""
        return Shape(num_logprobs=(self.top_logprobs or 0) if self.logprobs else None,
                     prompt_logprobs=self.prompt_logprobs, token_ids=bool(self.return_token_ids),
                     as_token_ids=bool(self.return_tokens_as_token_ids), chat_prefix=prefix, role=role,
                     **self._usage_shape())

    @field_validator("function_call", mode="before")
    @classmethod
    def _no_function_call(cls, value, info):
        return _unsupported(info.field_name, value, (None, "none"))

    @field_validator("tools")
    @classmethod
    def _tools(cls, value):
        check_tools(value, "none")
        return value

    def tool_mode(self) -> tuple[str, Optional[str]]:
        """("none" | "auto" | "required" | "named", the named function); a 400 on a bad combination."""
        try:
            return check_tools(self.tools, self.tool_choice)
        except ValueError as e:
            raise APIError(400, str(e), param="tool_choice") from None

    @field_validator("modalities", mode="before")
    @classmethod
    def _text_only(cls, value, info):
        return value if value is None or value == ["text"] else _unsupported(info.field_name, value)

    @field_validator("chat_template_kwargs")
    @classmethod
    def _safe_template_kwargs(cls, value):
        for k in value or {}:
            if k in _RESERVED_TEMPLATE_KWARGS or not k.isidentifier():
                raise ValueError(f"chat_template_kwargs may not set {k!r}")
        return value

    def sampling_params(self, default_max: int) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if max_tokens is not None and max_tokens < 1:
            field = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
            raise APIError(400, f"{field} must be an integer >= 1, got {max_tokens}", param=field)
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        params = self._sampling_params(max_tokens, logprobs, default_max)
        mode, name = self.tool_mode()
        if mode in ("required", "named"):  # the calls' JSON is constrained, so the arguments always parse
            if params.structured_outputs is not None:
                raise APIError(400, f"tool_choice {mode!r} constrains the output: it cannot be combined with "
                               f"{params.structured_outputs.source}", param="tool_choice")
            params.structured_outputs = tool_grammar(self.tools, mode, name, self.parallel_tool_calls is not False)
        return params

    def conversation(self) -> list[dict[str, Any]]:
        out = []
        for m in self.messages:
            content = m.content
            if isinstance(content, list):  # OpenAI content parts: keep the text ones
                parts = []
                for part in content:
                    if part.get("type") != "text":
                        raise APIError(400, f"content part type {part.get('type')!r} is not supported",
                                       param="messages")
                    parts.append(part.get("text", ""))
                content = "".join(parts)
            msg = {"role": m.role, "content": content or ""}
            extra = m.model_extra or {}
            if m.role == "assistant" and isinstance(extra.get("tool_calls"), list):
                msg["tool_calls"] = [_template_tool_call(c) for c in extra["tool_calls"]]
            if m.role == "tool" and isinstance(extra.get("tool_call_id"), str):
                msg["tool_call_id"] = extra["tool_call_id"]
            if m.role == "tool" and m.name is not None:
                msg["name"] = m.name
            out.append(msg)
        return out


def _template_tool_call(call: Any) -> Any:
    """An earlier assistant tool call as chat templates read it: arguments as an object, not JSON text."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise APIError(400, "messages: tool_calls entries must be {\"type\": \"function\", \"function\": {...}}",
                       param="messages")
    fn = dict(call["function"])
    if isinstance(fn.get("arguments"), str):
        try:
            fn["arguments"] = json.loads(fn["arguments"])
        except ValueError:
            pass
    return {**call, "function": fn}


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: Optional[str] = None
    tokens: list[int]

