"""Grammar compilation off the step loop: a small thread pool, a time cap, a cache bounded in bytes.

xgrammar (imported lazily, here only) compiles a spec against the model's vocabulary. Its compiles
release the GIL, so they run in a pool of `workers` threads beside the engine's step loop and the
replica's event loop. A caller waits at most `timeout_s` for its result, queueing included, and then
gets a ValueError (a 400): a catastrophic regex or schema never holds a request, the event loop or
a step. A compile past its cap cannot be interrupted inside xgrammar; it finishes in its thread and
its result is dropped, and at most `workers` such compiles run at a time (later ones wait their turn
and time out like any other), so their CPU is bounded too. Compiled grammars are kept by xgrammar's
own cache, least recently used first out once past `cache_bytes`, so a stream of unique schemas
cannot grow the process (reliability checklist rows 10-12).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import re
import threading
import time
from typing import Any, Optional

from raylight.utils.structured_params import StructuredOutputsParams

logger = logging.getLogger("raylight.structured")

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_CACHE_BYTES = 256 * 1024**2
VOCAB_POLL_S = 0.05  # how often a wait looks whether the vocabulary is ready (its cap starts then)
# "[12:00:00] /project/cpp/regex_converter.cc:94: " in front of xgrammar's messages; "Check failed: (...) is false:".
_NOISE = re.compile(r"\[[0-9:]+\]\s*\S+:\d+:\s*|Check failed: \(.*?\) is false:\s*")


def xgrammar_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("xgrammar") is not None


def clean_error(e: BaseException) -> str:
    """xgrammar's message without its timestamp, source path and check text; one line, bounded."""
    text = _NOISE.sub("", str(e)).strip().splitlines()
    text = text[0] if text else type(e).__name__
    return text[:300]


class GrammarCompileService:
    """Compiles `StructuredOutputsParams` into xgrammar `CompiledGrammar`s for one model's vocabulary."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids, timeout_s: float = DEFAULT_TIMEOUT_S,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, workers: int = 2):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.timeout_s = timeout_s
        self.cache_bytes = cache_bytes
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="raylight-grammar")
        self._lock = threading.Lock()
        self._compiler = None
        self._tokenizer_info = None
        # When the vocabulary (xgrammar's TokenizerInfo and compiler) was ready, on time.monotonic()'s clock:
        # built once, on the first compile, in 0.3-3 s by vocabulary size. The time cap counts from then, so
        # the first request is not refused for the engine's one-time setup (see `deadline`).
        self.vocab_ready_at: Optional[float] = None
        self.num_compiled = 0
        self.num_failed = 0
        self.num_timed_out = 0

    # ---- xgrammar objects, built on first use ----
    def _xgr_compiler(self):
        with self._lock:
            if self._compiler is None:
                if self.tokenizer is None:
                    raise ValueError("this model has no tokenizer, so its output cannot be constrained")
                import xgrammar as xgr

                t0 = time.perf_counter()
                self._install(xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                                 stop_token_ids=self.eos_token_ids or None))
                logger.info("structured outputs: xgrammar %s, vocabulary of %d tokens ready in %.2fs "
                            "(compile cap %.1fs, cache %d MiB)", xgr.__version__ if hasattr(xgr, "__version__")
                            else "", self.vocab_size, time.perf_counter() - t0, self.timeout_s,
                            self.cache_bytes // 2**20)
            return self._compiler

    def use_tokenizer_info(self, info) -> None:
        """Compile against this xgrammar TokenizerInfo instead of one built from the tokenizer (benchmarks on
        dummy-weight presets, which have no tokenizer)."""
        with self._lock:
            self._install(info)

    def _install(self, info) -> None:
        """The compiler for this vocabulary (under `_lock`); the time cap counts from now (`deadline`)."""
        import xgrammar as xgr

        self._tokenizer_info = info
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True,
                                             cache_limit_bytes=self.cache_bytes)
        self.vocab_ready_at = time.monotonic()

    @property
    def tokenizer_info(self):
        self._xgr_compiler()
        return self._tokenizer_info

    def cache_size_bytes(self) -> int:
        return self._compiler.get_cache_size_bytes() if self._compiler is not None else 0

    def _compile_now(self, spec: StructuredOutputsParams):
        compiler = self._xgr_compiler()
        kind, src = spec.kind, spec.source
        try:
            if kind == "json":
                schema = spec.json if isinstance(spec.json, str) else json.dumps(spec.json, ensure_ascii=False)
                grammar = compiler.compile_json_schema(schema, any_whitespace=not spec.disable_any_whitespace)
            elif kind == "json_object":
                if spec.disable_any_whitespace:
                    grammar = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
                else:
                    grammar = compiler.compile_json_schema('{"type": "object"}')
            elif kind == "regex":
                grammar = compiler.compile_regex(spec.regex)
            elif kind == "choice":
                grammar = compiler.compile_grammar(choice_ebnf(spec.choice))
            else:
                grammar = compiler.compile_grammar(spec.grammar)
        except Exception as e:  # xgrammar raises RuntimeError (and a few others) on a bad spec
            self.num_failed += 1
            what = {"json": "JSON schema", "json_object": "JSON", "regex": "regex", "choice": "choice",
                    "grammar": "grammar"}[kind]
            raise ValueError(f"{src}: invalid {what}: {clean_error(e)}") from None
        self.num_compiled += 1
        return grammar

    def submit(self, spec: StructuredOutputsParams) -> concurrent.futures.Future:
        return self._pool.submit(self._compile_now, spec)

    def timed_out(self, spec: StructuredOutputsParams) -> ValueError:
        """Counts a compile that passed the time cap and returns the error its request gets."""
        self.num_timed_out += 1
        logger.warning("structured outputs: a %s did not compile within %.1fs; refused", spec.kind, self.timeout_s)
        return ValueError(f"{spec.source}: the {spec.kind} did not compile within {self.timeout_s:g} s "
                          "(too complex); simplify it")

    def deadline(self, submitted: float) -> Optional[float]:
        """When a compile submitted at `submitted` (time.monotonic()) passes the time cap: `timeout_s` after
        the later of its submission and the vocabulary being ready; None while the vocabulary is still being
        built (the one-time setup does not count against a request's grammar)."""
        if self.vocab_ready_at is None:
            return None
        return max(submitted, self.vocab_ready_at) + self.timeout_s

    def _next_wait(self, submitted: float) -> tuple[Optional[float], float]:
        """(the deadline, how long to wait before looking again): until the deadline, or a poll while the
        vocabulary is still being built."""
        give_up = self.deadline(submitted)
        return give_up, VOCAB_POLL_S if give_up is None else max(0.0, give_up - time.monotonic())

    def _wait(self, fut: concurrent.futures.Future, submitted: float):
        while True:
            give_up, wait = self._next_wait(submitted)
            try:
                return fut.result(timeout=wait)
            except concurrent.futures.TimeoutError:
                if give_up is not None and time.monotonic() >= give_up:
                    raise

    def compile(self, spec: StructuredOutputsParams):
        """Blocking (offline use); raises ValueError on a bad spec or past the time cap."""
        submitted = time.monotonic()
        fut = self.submit(spec)
        try:
            return self._wait(fut, submitted)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise self.timed_out(spec) from None

    async def compile_async(self, spec: StructuredOutputsParams):
        """Awaitable on an event loop, which it never blocks; raises ValueError like `compile`."""
        submitted = time.monotonic()
        fut = self.submit(spec)
        waiting = asyncio.wrap_future(fut)
        while True:
            give_up, wait = self._next_wait(submitted)
            done, _ = await asyncio.wait({waiting}, timeout=wait)
            if done:
                return waiting.result()
            if give_up is not None and time.monotonic() >= give_up:
                waiting.cancel()  # and `fut`: still queued, it never runs; running, it ends in its thread, dropped
                raise self.timed_out(spec) from None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def choice_ebnf(choices: list[str]) -> str:
    """root ::= "a" | "b" ..., each choice a JSON-escaped string literal."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def compile_info(service: Optional[GrammarCompileService]) -> dict[str, Any]:
    if service is None:
        return {}
    return {"grammar_compiles": service.num_compiled, "grammar_compile_failures": service.num_failed,
            "grammar_compile_timeouts": service.num_timed_out, "grammar_cache_bytes": service.cache_size_bytes()}
