"""A fake engine handle and tokenizer for the ingress tests: `OpenAIServer` is plain Python, so
its app runs in-process with no Ray and no model."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from raylight.messages import GenerateCall, ReplicaMessage, ReplicaStats
from raylight.outputs import CompletionOutput, RequestOutput

KV_BLOCKS = 32


class Remote:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


class Stream:
    """What `handle.options(stream=True).generate.remote(call)` returns: an async iterator of
    ReplicaMessages with cancel(). `endless`: after its messages it waits forever (until cancelled)."""

    def __init__(self, msgs, endless=False, on_cancel=None):
        self.msgs = list(msgs)
        self.endless = endless
        self.cancelled = False
        self.on_cancel = on_cancel

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.msgs:
            if self.endless and not self.cancelled:
                await asyncio.sleep(3600)
            raise StopAsyncIteration
        return self.msgs.pop(0)

    def cancel(self):
        if not self.cancelled and self.on_cancel is not None:
            self.on_cancel()
        self.cancelled = True


class FakeEngine:
    """Answers each generate call with the prompt's ids echoed back reversed; `endless`: streams one
    token per call and then never finishes, holding 4 KV blocks until cancelled. Remembers the
    prefix-cache salt of each prompt it saw, and reports a prefix hit for a (salt, prompt) seen before."""

    def __init__(self, endless=False):
        self.calls: list[GenerateCall] = []
        self.endless = endless
        self.free_blocks = KV_BLOCKS
        self.seen: set = set()
        self.health = Remote(self._health)
        self.generate = Remote(self._generate)
        self.stats = Remote(self._stats)

    async def _health(self):
        return True

    async def _stats(self):
        return ReplicaStats("r0", self._metrics())

    def _metrics(self):
        return {"num_running": int(self.free_blocks < KV_BLOCKS), "kv_blocks_total": KV_BLOCKS,
                "kv_blocks_free": self.free_blocks}

    def _generate(self, call: GenerateCall):
        self.calls.append(call)
        key = (call.cache_salt, tuple(call.prompt))
        cached = len(call.prompt) if key in self.seen else 0
        self.seen.add(key)
        if self.endless:
            self.free_blocks -= 4

            def release():
                self.free_blocks += 4
            out = RequestOutput(call.request_id, None, list(call.prompt), [CompletionOutput(
                0, "<1>", [1], delta_text="<1>", delta_token_ids=[1])], finished=False)
            return Stream([ReplicaMessage(output=out, replica_id="r0")], endless=True, on_cancel=release)
        ids = list(reversed(call.prompt))[: call.params.max_tokens]
        out = RequestOutput(call.request_id, None, list(call.prompt), [CompletionOutput(
            0, "".join(f"<{i}>" for i in ids), ids, finish_reason="length", delta_text="", delta_token_ids=ids)],
            finished=True, num_cached_tokens=cached)
        return Stream([ReplicaMessage(output=out, replica_id="r0", stats=self._metrics())])

    def options(self, **_):
        return self


class FakeTokenizer:
    """One token per character; `slow_s`: each call on text longer than 100 characters blocks its
    thread that long (a huge prompt's tokenization)."""

    chat_template = "{{ messages }}"

    def __init__(self, slow_s: float = 0.0):
        self.slow_s = slow_s

    def __call__(self, text, add_special_tokens=True):
        if self.slow_s and len(text) > 100:
            time.sleep(self.slow_s)
        return SimpleNamespace(input_ids=[ord(c) % 90 + 1 for c in text])

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, **kwargs):
        if any(m["content"] == "raise" for m in messages):  # a template error that leaks internals
            raise RuntimeError("template error at /usr/lib/python3/site-packages/jinja2/x.py, object at "
                               "0x7f3a2b1c9d80\nTraceback (most recent call last):\n  File \"/srv/a.py\"")
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" if add_generation_prompt
                                                                           else "")
        return self(text).input_ids

    def decode(self, ids, **_):
        return "".join(chr(i + 31) for i in ids)

    def __len__(self):
        return 100
