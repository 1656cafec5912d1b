"""One batch line's request and its result row, in the server's shapes.

Requests are validated by the server's own pydantic models and mapped onto `SamplingParams` by them
(`raylight.cluster.protocol`), chat messages are rendered by the engine's chat-template helper, and the
response bodies are written by the server's own `raylight.cluster.openai_outputs` (logprobs, echo,
prompt_logprobs, return_token_ids, ...), so they have the shape `/v1/chat/completions` and `/v1/completions`
answer with (the ingress is not imported here, since it needs FastAPI and Ray Serve).

Result rows follow OpenAI's batch output format (vLLM's `run_batch` writes the same):
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`. A request the server
would answer with a 400 gets `response.status_code` 400 with the server's error body, and `error` set to
its code and message too, so a failed row is found by `error != null` alone. A line that is not a request
(not JSON, no custom_id, a repeated custom_id, a wrong method or url) has `response: null` and `error`;
when it has no usable custom_id the row also carries `line`, its line number in the input.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Union

from pydantic import ValidationError

from raylight.batch.lines import BatchItem
from raylight.cluster.openai_outputs import Formatter, usage
from raylight.cluster.protocol import APIError, ChatCompletionRequest, CompletionRequest
from raylight.engine.tokenizer import apply_chat_template
from raylight.outputs import RequestOutput
from raylight.sampling_params import SamplingParams


@dataclass
class Prepared:
    """A line ready for the engine: one prompt (chat) or several (a completions line may hold a list)."""

    item: BatchItem
    request_id: str
    chat: bool
    prompts: list[list[int]]
    params: SamplingParams
    fmt: Formatter  # what the request asked to get back, and how it is written
    explicit_max: Optional[int]
    texts: list[str]  # completions echo: each prompt's text


def prepare(item: BatchItem, tokenizer, max_model_len: int, default_max_tokens: int) -> Prepared:
    """Validates the line's body and tokenizes it; raises APIError (the server's 400) when it cannot run."""
    chat = item.url == "/v1/chat/completions"
    model = ChatCompletionRequest if chat else CompletionRequest
    try:
        body: Union[ChatCompletionRequest, CompletionRequest] = model.model_validate(item.body)
    except ValidationError as e:
        raise validation_error(e) from None
    if body.stream:
        raise APIError(400, "stream is not supported in a batch job", param="stream")
    params = body.sampling_params(default_max_tokens)
    fmt = Formatter(tokenizer, body.response_shape())
    texts: list[str] = []
    if chat:
        try:
            prompts = [apply_chat_template(tokenizer, body.conversation(), body.add_generation_prompt,
                                           **(body.template_kwargs() or {}))]
        except APIError:
            raise
        except Exception as e:  # no template, or one that raises on this conversation
            raise APIError(400, f"chat template failed: {e}", param="messages") from None
        explicit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        prompts = [body.truncate(prompts[0], max_model_len, explicit)]
    else:
        prompts = []
        for p in body.prompts():
            if isinstance(p, list):
                full = p
            elif tokenizer is None:
                raise APIError(400, "this model has no tokenizer: send prompts as token ids", param="prompt")
            elif not p:
                raise APIError(400, "prompt is empty", param="prompt")
            else:
                full = list(tokenizer(p, add_special_tokens=body.add_special_tokens).input_ids)
            ids = body.truncate(full, max_model_len, body.max_tokens)
            prompts.append(ids)
            texts.append(p if isinstance(p, str) and len(ids) == len(full) else
                         tokenizer.decode(ids) if body.echo and tokenizer is not None else "")
        explicit, max_param = body.max_tokens or None, "max_tokens"  # echo's max_tokens 0 generates nothing
    for ids in prompts:
        _check_context(len(ids), explicit, max_model_len, "messages" if chat else "prompt", max_param)
    rid = body.request_id or f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    return Prepared(item, rid, chat, prompts, params, fmt, explicit, texts)


def validation_error(e: ValidationError) -> APIError:
    """A pydantic error as the server's 400: each problem as "field: message", the first field as param."""
    errs = e.errors()
    parts = []
    for err in errs:
        loc = ".".join(str(x) for x in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    param = str(errs[0]["loc"][0]) if errs and errs[0]["loc"] else None
    return APIError(400, "; ".join(parts), param=param)


def _check_context(n_prompt: int, explicit_max: Optional[int], max_model_len: int, prompt_param: str,
                   max_param: str) -> None:
    """OpenAI's 400 (context_length_exceeded) for what the server also refuses before it runs."""
    if n_prompt >= max_model_len or (explicit_max is not None and n_prompt + explicit_max > max_model_len):
        asked = n_prompt + (explicit_max or 0)
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                       f"{asked} tokens ({n_prompt} in the {prompt_param}, {explicit_max or 0} in the completion). "
                       f"Please reduce the length of the {prompt_param} or completion.",
                       param=prompt_param if n_prompt >= max_model_len else max_param,
                       code="context_length_exceeded")


# ---------------------------------------------------------------- result rows

def _row(item: BatchItem, response: Optional[dict[str, Any]], error: Optional[dict[str, Any]]) -> dict[str, Any]:
    row = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": item.custom_id, "response": response, "error": error}
    if item.key[0] == "line":
        row["line"] = item.line
    return row


def line_error_row(item: BatchItem) -> dict[str, Any]:
    """A line that is not a request (item.error)."""
    code, message = item.error
    return _row(item, None, {"code": code, "message": message})


def api_error_row(item: BatchItem, e: APIError, request_id: Optional[str] = None) -> dict[str, Any]:
    """A request the server would refuse with e.status, with the server's error body."""
    rid = request_id or f"req-{uuid.uuid4().hex}"
    return _row(item, {"status_code": e.status, "request_id": rid, "body": e.body()},
                {"code": e.code or e.type, "message": e.message})


def ok_row(prep: Prepared, outputs: list[RequestOutput], model_name: str, tokenizer) -> dict[str, Any]:
    body = (chat_body if prep.chat else completion_body)(prep, outputs, model_name, tokenizer)
    return _row(prep.item, {"status_code": 200, "request_id": prep.request_id, "body": body}, None)


def chat_body(prep: Prepared, outputs: list[RequestOutput], model_name: str, tokenizer) -> dict[str, Any]:
    [out] = outputs
    fmt = prep.fmt
    return {"id": prep.request_id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
            "choices": [fmt.chat_choice(c) for c in out.outputs],
            "usage": usage(len(out.prompt_token_ids), fmt.completion_tokens(out), out.num_cached_tokens),
            **fmt.chat_extras(out)}


def completion_body(prep: Prepared, outputs: list[RequestOutput], model_name: str, tokenizer) -> dict[str, Any]:
    n, fmt = prep.params.n, prep.fmt
    choices = [fmt.completion_choice(i * n + c.index, out, c, prep.texts[i]) for i, out in enumerate(outputs)
               for c in out.outputs]
    return {"id": prep.request_id, "object": "text_completion", "created": int(time.time()), "model": model_name,
            "choices": choices, "usage": usage(sum(len(o.prompt_token_ids) for o in outputs),
                                               sum(fmt.completion_tokens(o) for o in outputs),
                                               sum(o.num_cached_tokens for o in outputs))}
