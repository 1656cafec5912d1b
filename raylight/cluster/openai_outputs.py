"""One request's outputs in OpenAI's response shapes, with the optional parts OpenAI and vLLM define:
logprobs (chat's and the completions API's), `echo` (the prompt and its logprobs before the completion;
chat: the final message's content before the reply), vLLM's `prompt_logprobs`, `return_token_ids`,
`return_tokens_as_token_ids`, and usage (with `prompt_tokens_details.cached_tokens`; in streams at the
end, or in every chunk with `stream_options.continuous_usage_stats`).

Plain functions of `RequestOutput`s: the ingress decides what a request asked for (`Shape`), this module
writes it. Non-streamed choices come from `Formatter.completion_choice` / `chat_choice`; a stream keeps
a `StreamWriter` that turns each `RequestOutput` into the chunk's choices (each choice's finish_reason
is sent once, text offsets run on across chunks, the echo comes first)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from raylight.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput

_FLOOR = -9999.0  # -inf is not JSON: OpenAI's (and vLLM's) stand-in


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


@dataclass(frozen=True)
class Shape:
    """What one request asked to get back."""

    num_logprobs: Optional[int] = None  # alternatives per output token (logprobs / top_logprobs); None: none
    prompt_logprobs: Optional[int] = None  # vLLM's prompt_logprobs: returned beside the choices
    echo: bool = False  # completions: the prompt's text (and logprobs) before each completion
    echo_only: bool = False  # completions echo with max_tokens 0: the prompt and nothing generated
    token_ids: bool = False  # return_token_ids: prompt_token_ids and each choice's token_ids
    as_token_ids: bool = False  # return_tokens_as_token_ids: logprob tokens written "token_id:N"
    include_usage: bool = False  # streams: a usage chunk at the end
    continuous_usage: bool = False  # streams: usage in every chunk too
    chat_prefix: str = ""  # chat echo: the final message's content, before the reply
    role: str = "assistant"  # the reply's role (the final message's without add_generation_prompt)


class Formatter:
    def __init__(self, tokenizer, shape: Shape):
        self.tokenizer = tokenizer
        self.shape = shape

    # ---- one token ----
    def token(self, token_id: int, entry: Optional[PositionLogprobs] = None) -> str:
        if self.shape.as_token_ids:
            return f"token_id:{token_id}"
        lp = entry.get(token_id) if entry else None
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)

    def _alt(self, token_id: int, lp: Logprob) -> str:
        if self.shape.as_token_ids:
            return f"token_id:{token_id}"
        return lp.decoded_token if lp.decoded_token is not None else self.token(token_id)

    @staticmethod
    def _top(entry: PositionLogprobs, k: int) -> list[tuple[int, Logprob]]:
        """The alternatives ranked 1..k, best first (the engine may have computed more for another use)."""
        return sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= k),
                      key=lambda x: x[1].rank)

    # ---- logprobs, OpenAI's two shapes ----
    def chat_logprobs(self, logprobs: Optional[list[PositionLogprobs]], token_ids: list[int]) -> list[dict]:
        k = self.shape.num_logprobs or 0  # top_logprobs 0: the chosen token's logprob, no alternatives
        out = []
        for tok, entry in zip(token_ids, logprobs or []):
            text = self.token(tok, entry)
            out.append({"token": text, "logprob": max(entry[tok].logprob, _FLOOR), "bytes": list(text.encode()),
                        "top_logprobs": [{"token": (s := self._alt(t, lp)), "logprob": max(lp.logprob, _FLOOR),
                                          "bytes": list(s.encode())} for t, lp in self._top(entry, k)]})
        return out

    def completion_logprobs(self, logprobs: list[Optional[PositionLogprobs]], token_ids: list[int],
                            offset: int = 0) -> dict[str, list]:
        """`logprobs[i]` None: a position with no logprob (the prompt's first token, under echo)."""
        k = self.shape.num_logprobs or 0
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for tok, entry in zip(token_ids, logprobs):
            text = self.token(tok, entry)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            if entry is None:
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            token_logprobs.append(max(entry[tok].logprob, _FLOOR))
            top = {text: token_logprobs[-1]}  # the chosen token, then the k most likely (OpenAI's k + 1)
            for t, lp in self._top(entry, k):
                top.setdefault(self._alt(t, lp), max(lp.logprob, _FLOOR))
            top_logprobs.append(top)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}

    def prompt_logprobs(self, plps: Optional[list[Optional[PositionLogprobs]]],
                        prompt_ids: list[int]) -> Optional[list[Optional[dict]]]:
        """vLLM's shape: per prompt position None (the first) or {token id: {logprob, rank, decoded_token}}
        holding the prompt's token and the prompt_logprobs most likely ones."""
        if plps is None:
            return None
        k = self.shape.prompt_logprobs or 0
        out: list[Optional[dict]] = []
        for tok, entry in zip(prompt_ids, plps):
            if entry is None:
                out.append(None)
                continue
            keep = {tok: entry[tok], **dict(self._top(entry, k))}
            out.append({str(t): {"logprob": max(lp.logprob, _FLOOR), "rank": lp.rank,
                                 "decoded_token": lp.decoded_token} for t, lp in keep.items()})
        return out

    # ---- non-streamed choices ----
    def completion_choice(self, index: int, out: RequestOutput, c: CompletionOutput, prompt_text: str) -> dict:
        shape = self.shape
        text, token_ids = c.text, list(c.token_ids)
        if shape.echo_only:
            text, token_ids = "", []
        logprobs = None
        if shape.num_logprobs is not None:
            lps: list[Optional[PositionLogprobs]] = list(c.logprobs or [])[:len(token_ids)]
            ids = token_ids
            if shape.echo:
                ids = list(out.prompt_token_ids) + token_ids
                lps = _prompt_part(out) + lps
            logprobs = self.completion_logprobs(lps, ids)
        choice = {"index": index, "text": (prompt_text if shape.echo else "") + text, "logprobs": logprobs,
                  "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
        if shape.prompt_logprobs is not None:
            choice["prompt_logprobs"] = self.prompt_logprobs(out.prompt_logprobs, out.prompt_token_ids)
        if shape.token_ids:
            choice["prompt_token_ids"] = list(out.prompt_token_ids)
            choice["token_ids"] = token_ids
        return choice

    def chat_choice(self, c: CompletionOutput) -> dict:
        choice = {"index": c.index, "message": {"role": self.shape.role, "content": self.shape.chat_prefix + c.text},
                  "logprobs": ({"content": self.chat_logprobs(c.logprobs, c.token_ids)}
                               if self.shape.num_logprobs is not None else None),
                  "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
        if self.shape.token_ids:
            choice["token_ids"] = list(c.token_ids)
        return choice

    def chat_extras(self, out: RequestOutput) -> dict:
        """The top-level fields vLLM adds to a chat completion."""
        extras: dict[str, Any] = {}
        if self.shape.prompt_logprobs is not None:
            extras["prompt_logprobs"] = self.prompt_logprobs(out.prompt_logprobs, out.prompt_token_ids)
        if self.shape.token_ids:
            extras["prompt_token_ids"] = list(out.prompt_token_ids)
        return extras

    def completion_tokens(self, out: RequestOutput) -> int:
        return 0 if self.shape.echo_only else sum(len(c.token_ids) for c in out.outputs)


def _prompt_part(out: RequestOutput) -> list[Optional[PositionLogprobs]]:
    """The prompt positions' logprobs (the first has none); None everywhere when the engine returned none."""
    plps = list(out.prompt_logprobs or [])
    n = len(out.prompt_token_ids)
    return (plps + [None] * n)[:n]


@dataclass
class _ChoiceState:
    started: bool = False  # the echo (or the prompt's token ids) went out
    finished: bool = False  # its finish_reason went out: nothing more for it
    text_offset: int = 0
    num_tokens: int = 0


@dataclass
class StreamWriter:
    """A stream's choices, chunk by chunk."""

    fmt: Formatter
    chat: bool
    prompt_text: str = ""  # completions echo
    choices: dict[int, _ChoiceState] = field(default_factory=dict)

    def opening(self, n: int) -> list[list[dict]]:
        """The chunks' choices before any token: chat's role chunk, then its echo."""
        if not self.chat:
            return []
        chunks = [[{"index": i, "delta": {"role": self.fmt.shape.role, "content": ""}, "logprobs": None,
                    "finish_reason": None} for i in range(n)]]
        if self.fmt.shape.chat_prefix:
            chunks.append([{"index": i, "delta": {"content": self.fmt.shape.chat_prefix}, "logprobs": None,
                            "finish_reason": None} for i in range(n)])
        return chunks

    def completion_tokens(self) -> int:
        return sum(s.num_tokens for s in self.choices.values())

    def step(self, out: RequestOutput) -> list[dict]:
        """The choices of the chunk for this output (empty: nothing to send)."""
        choices = []
        for c in out.outputs:
            state = self.choices.setdefault(c.index, _ChoiceState())
            if state.finished:
                continue  # its finish_reason was sent: never repeated
            echo_now = self.fmt.shape.echo and not state.started
            if not (c.delta_text or c.delta_token_ids or c.finish_reason is not None or echo_now):
                continue
            choices.append(self._choice(out, c, state))
        return choices

    def _choice(self, out: RequestOutput, c: CompletionOutput, state: _ChoiceState) -> dict:
        shape, fmt = self.fmt.shape, self.fmt
        text, ids = c.delta_text, list(c.delta_token_ids)
        lps: list[Optional[PositionLogprobs]] = list(c.delta_logprobs or [])[:len(ids)]
        if shape.echo_only:
            text, ids, lps = "", [], []
        first = not state.started
        state.started = True
        if shape.echo and first:
            text = self.prompt_text + text
            lps = _prompt_part(out) + lps
            log_ids = list(out.prompt_token_ids) + ids
        else:
            log_ids = ids
        state.num_tokens += len(ids)
        logprobs = None
        if shape.num_logprobs is not None and log_ids:
            logprobs = ({"content": fmt.chat_logprobs(lps, log_ids)} if self.chat
                        else fmt.completion_logprobs(lps, log_ids, state.text_offset))
        state.text_offset += len(text)
        choice: dict[str, Any] = {"index": c.index, "logprobs": logprobs, "finish_reason": c.finish_reason}
        if c.finish_reason is not None:
            state.finished = True
            choice["stop_reason"] = c.stop_reason
        if self.chat:
            choice["delta"] = {"content": text} if text or c.finish_reason is None else {}
        else:
            choice["text"] = text
            if shape.token_ids and first:
                choice["prompt_token_ids"] = list(out.prompt_token_ids)
        if shape.token_ids:
            choice["token_ids"] = ids
        return choice


def tokenizer_info(tokenizer) -> dict[str, Any]:
    """vLLM's /tokenizer_info: the tokenizer's configuration (what lm-evaluation-harness's remote tokenizer
    reads: eos/bos/pad tokens, the chat template), without file paths."""
    config = getattr(tokenizer, "init_kwargs", None) or {}
    info = {k: v for k, v in ((k, _jsonable(v)) for k, v in config.items()) if v is not None and not _path_like(k)}
    info.update(tokenizer_class=type(tokenizer).__name__, chat_template=getattr(tokenizer, "chat_template", None),
                **{name: getattr(tokenizer, name, None) for name in ("eos_token", "bos_token", "pad_token",
                                                                     "unk_token")})
    return info


def _jsonable(value):
    """A tokenizer config value as JSON (AddedToken objects as their text); None where it has no JSON form."""
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) or value is None else None


def _path_like(key: str) -> bool:
    return key == "name_or_path" or key.endswith(("_file", "_path", "_dir"))
