"""OpenAI-compatible HTTP ingress (FastAPI through Serve).

The ingress authenticates, validates, renders chat templates and tokenizes, then streams
from an engine replica through Serve's streaming handle (Serve's router picks the replica
with the fewest requests in flight, of two sampled). A client that disconnects cancels the
stream, which aborts the request wherever it is (raylight/cluster/streams.py); responses are
shaped by raylight/cluster/openai_outputs.py.

Nothing here is module state: `OpenAIServer` holds one server's logic and settings (engine
handle, tokenizer, API key, metrics), and `build_api(server)` builds that server's own FastAPI
app (routes, auth, error handlers), so two servers in one process share nothing. `OpenAIIngress`
is the Serve deployment: it resolves the model, and Serve calls its `__serve_build_asgi_app__`
after the constructor (`@serve.ingress()` without an app) to get the instance's app.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime.

import asyncio
import contextlib
import concurrent.futures
import logging
import time
import uuid
from typing import Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from raylight import __version__
from raylight.cluster.http_edge import (DEFAULT_MAX_REQUEST_BODY_BYTES, ERROR_RESPONSES, Guard, LoadCounter,
                                        api_error, combine_salts, context_error, http_error, internal_error,
                                        sanitize, validation_error)
from raylight.cluster.metrics import RequestTiming, ServerMetrics, running_replica_ids
from raylight.cluster.openai_outputs import Formatter, StreamWriter, tokenizer_info, usage
from raylight.cluster.protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                       TokenizeRequest)
from raylight.cluster.streams import EngineStream, first_message, run_to_end, sse_response
from raylight.cluster.chat_tools import ChatTools
from raylight.cluster.tool_parsers import get_parser
from raylight.messages import GenerateCall
from raylight.outputs import RequestOutput

logger = logging.getLogger("raylight.ingress")

# Text longer than max_model_len * this many characters is first tokenized by its head alone:
# when the head is already over the context window, the request is refused without
# tokenizing (or templating) the rest.
_CHARS_PER_TOKEN_CAP = 16


class OpenAIServer:
    """One OpenAI-compatible server: its engine handle, tokenizer, API key and metrics. Plain
    Python (no Ray needed to build one); `build_api(server)` gives its HTTP app, and the route
    methods below take the parsed body (and the request, where a disconnect aborts the work)."""

    def __init__(self, engine_handle, served_model_name: str, tokenizer, max_model_len: int,
                 api_key: Optional[str] = None, default_max_tokens: int = 256,
                 api_keys: Sequence[str] = (), max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES,
                 tokenize_timeout_s: float = 10.0, tool_call_parser: Optional[str] = None):
        self.engine = engine_handle
        # Reads tool calls out of the text of tool_choice 'auto' requests (raylight/cluster/tool_parsers.py).
        self.tool_parser = get_parser(tool_call_parser)
        self.served_model_name = served_model_name
        self.tokenizer = tokenizer  # None: prompts must be token ids
        self.max_model_len = max_model_len
        self.api_key = api_key  # None and no api_keys: no authentication
        self.api_keys = [k for k in dict.fromkeys(([api_key] if api_key else []) + list(api_keys or ()))]
        self.default_max_tokens = default_max_tokens
        self.max_request_body_bytes = max_request_body_bytes
        self.tokenize_timeout_s = tokenize_timeout_s
        # Tokenizing and chat templating run here, off the event loop; a small pool bounds the
        # CPU they take, and a request waiting for it longer than tokenize_timeout_s gets a 400.
        self._tokenize_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self.metrics = ServerMetrics()  # its own registry
        self.peers = None  # a PeerLink when the app runs several ingress replicas (cluster/ingress_peers.py)
        self.server_load = 0  # generation requests in flight here, streams until their end (vLLM's /load)
        self.created = int(time.time())

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve calls this on the replica after the constructor: this instance's own app."""
        return build_api(self)

    # ---- helpers ----
    def _check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.served_model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.served_model_name!r}",
                           "not_found_error", param="model", code="model_not_found")

    async def _off_loop(self, fn, *args, param: str):
        """Runs tokenizer work in the server's small pool, never on the event loop, for at most
        tokenize_timeout_s (waiting for the pool included)."""
        if self._tokenize_pool is None:
            self._tokenize_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="raylight-tokenize")
        fut = asyncio.wrap_future(self._tokenize_pool.submit(fn, *args))
        try:
            return await asyncio.wait_for(fut, self.tokenize_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(400, f"the prompt took longer than {self.tokenize_timeout_s:g} s to tokenize",
                           param=param, code="tokenize_timeout") from None

    def _check_head(self, texts: list[str], param: str) -> None:
        """Refuses text whose first max_model_len * 16 characters already exceed the window."""
        cap = self.max_model_len * _CHARS_PER_TOKEN_CAP
        if sum(len(t) for t in texts) <= cap:
            return
        head, left = [], cap
        for t in texts:
            head.append(t[:left])
            left -= len(head[-1])
            if left <= 0:
                break
        n = len(self.tokenizer("".join(head), add_special_tokens=False).input_ids)
        if n >= self.max_model_len:
            raise context_error(self.max_model_len, n, 0, param, lower_bound=True)

    def _encode(self, prompt: str, add_special_tokens: bool) -> list[int]:
        self._check_head([prompt], "prompt")
        return list(self.tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids)

    def _encode_whole(self, prompt: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids)

    async def _tokenize(self, prompt, add_special_tokens: bool = True, check_head: bool = True) -> list[int]:
        """`check_head` False: a prompt that truncate_prompt_tokens will cut may exceed the window (the body
        limit and tokenize_timeout_s still bound the work)."""
        if isinstance(prompt, list):
            # The engine checks the upper bound against the model's vocabulary; a negative id is never valid,
            # and the echo would decode it before the engine sees it.
            if not prompt:
                raise APIError(400, "prompt is empty (a list of no token ids)", param="prompt")
            bad = next((t for t in prompt if t < 0), None)
            if bad is not None:
                raise APIError(400, f"prompt token id {bad} is outside the vocabulary", param="prompt")
            return prompt
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send prompts as token ids", param="prompt")
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        encode = self._encode if check_head else self._encode_whole
        return await self._off_loop(encode, prompt, add_special_tokens, param="prompt")

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        try:
            return self.tokenizer.decode(ids)
        except Exception as e:  # an id this tokenizer cannot decode (the model's vocabulary may be wider)
            raise APIError(400, f"prompt cannot be decoded: {type(e).__name__}: {sanitize(str(e))}",
                           param="prompt") from None

    def _render(self, conversation, add_generation_prompt: bool, kwargs, check_head: bool = True) -> list[int]:
        from raylight.engine.tokenizer import apply_chat_template

        if self.tokenizer is not None and check_head:
            self._check_head([m["content"] for m in conversation if isinstance(m.get("content"), str)], "messages")
        try:
            return apply_chat_template(self.tokenizer, conversation, add_generation_prompt, **(kwargs or {}))
        except APIError:
            raise
        except ValueError as e:
            raise APIError(400, sanitize(str(e)), param="messages") from None
        except Exception as e:  # a template that raises on this conversation
            raise APIError(400, f"chat template failed: {type(e).__name__}: {sanitize(str(e))}",
                           param="messages") from None

    async def _chat_ids(self, conversation, add_generation_prompt: bool = True, kwargs=None,
                        check_head: bool = True) -> list[int]:
        return await self._off_loop(self._render, conversation, add_generation_prompt, kwargs, check_head,
                                    param="messages")

    def _check_context(self, n_prompt: int, explicit_max: Optional[int], prompt_param: str, max_param: str) -> None:
        """OpenAI's 400 for a prompt that fills the window, or an explicit max_tokens that cannot fit."""
        if n_prompt >= self.max_model_len:
            raise context_error(self.max_model_len, n_prompt, explicit_max or 0, prompt_param)
        if explicit_max is not None and n_prompt + explicit_max > self.max_model_len:
            raise context_error(self.max_model_len, n_prompt, explicit_max, max_param)

    @staticmethod
    def _salt(request: Request, client_salt: Optional[str]) -> Optional[str]:
        return combine_salts(request.scope.get("raylight.tenant_salt"), client_salt)

    def _stream(self, call: GenerateCall):
        return self.engine.options(stream=True).generate.remote(call)

    def _open(self, call: GenerateCall, request: Request) -> EngineStream:
        if self.peers is not None:
            self.peers.start()  # sharing starts with the first request (the constructor has no running loop)
        return EngineStream(self._stream(call), request, self.metrics)

    async def _run_to_end(self, request: Request, call: GenerateCall, timing) -> RequestOutput:
        return await run_to_end(self._open(call, request), self.metrics, timing)

    async def _sse(self, request: Request, call: GenerateCall, rid: str, writer: StreamWriter):
        es = self._open(call, request)
        first = await first_message(es, self.metrics)  # errors become a status code, not a broken stream
        return sse_response(es, first, call, rid, writer, self.served_model_name, self.metrics)

    # ---- routes ----
    async def health(self):
        try:
            ok = await asyncio.wait_for(self.engine.health.remote(), timeout=5)
        except Exception:
            ok = False
        if not ok:
            return JSONResponse(APIError(503, "engine not ready", "service_unavailable").body(), status_code=503)
        return Response(status_code=200)

    async def version(self):
        return {"version": __version__}

    async def render_metrics(self):
        with contextlib.suppress(Exception):  # else serve what we last heard
            stats = await asyncio.wait_for(self.engine.stats.remote(), timeout=2)
            self.metrics.update_replica(stats.replica_id, stats.metrics)
        self.metrics.retain_replicas(await running_replica_ids())  # a scaled-down replica's KV leaves the gauges
        if self.peers is not None:  # the other ingress replicas' requests, counted too
            await self.peers.exchange()
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    async def list_models(self):
        return {"object": "list", "data": [{
            "id": self.served_model_name, "object": "model", "created": self.created, "owned_by": "raylight",
            "max_model_len": self.max_model_len}]}

    async def tokenizer_info(self):
        if self.tokenizer is None:
            raise APIError(404, "this model has no tokenizer", "not_found_error")
        return tokenizer_info(self.tokenizer)

    async def load(self):
        """vLLM's /load: how many generation requests this server (this ingress replica) is handling."""
        return {"server_load": self.server_load}

    async def invocations(self, request: Request):
        """SageMaker's /invocations: the body says which API it is for (messages: chat completions; prompt:
        completions), as vLLM routes it."""
        try:
            body = await request.json()
        except ValueError:
            raise APIError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        kind = ChatCompletionRequest if "messages" in body else CompletionRequest if "prompt" in body else None
        if kind is None:
            raise APIError(400, "/invocations takes a chat completion (messages) or a completion (prompt) body",
                           param="messages")
        try:
            parsed = kind.model_validate(body)
        except ValidationError as e:
            raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None
        if kind is ChatCompletionRequest:
            return await self.chat_completions(parsed, request)
        return await self.completions(parsed, request)

    async def tokenize(self, body: TokenizeRequest):
        self._check_model(body.model)
        if body.messages is not None:
            ids = await self._chat_ids([m.model_dump() for m in body.messages], body.add_generation_prompt)
        elif body.prompt is not None:
            ids = await self._tokenize(body.prompt, body.add_special_tokens)
        else:
            raise APIError(400, "give prompt or messages", param="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len}

    async def detokenize(self, body: DetokenizeRequest):
        self._check_model(body.model)
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer", param="tokens")
        bad = [t for t in body.tokens if not 0 <= t < len(self.tokenizer)]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary", param="tokens")
        return {"prompt": self.tokenizer.decode(body.tokens)}

    async def completions(self, body: CompletionRequest, request: Request):
        self._check_model(body.model)
        params = body.sampling_params(self.default_max_tokens)
        fmt = Formatter(self.tokenizer, body.response_shape())
        prompts, texts = [], []  # token ids as the engine gets them; the text echo returns
        truncating = body.truncate_prompt_tokens is not None
        for p in body.prompts():
            full = await self._tokenize(p, body.add_special_tokens, check_head=not truncating)
            ids = body.truncate(full, self.max_model_len, body.max_tokens)
            self._check_context(len(ids), body.max_tokens or None, "prompt", "max_tokens")
            prompts.append(ids)
            texts.append(p if isinstance(p, str) and len(ids) == len(full) else self._decode(ids) if body.echo else "")
        rid = body.request_id or f"cmpl-{uuid.uuid4().hex}"
        salt = self._salt(request, body.cache_salt)
        calls = [GenerateCall(f"{rid}-{i}", ids, params, salt, stream=body.stream) for i, ids in enumerate(prompts)]
        if body.stream:
            if len(calls) != 1:
                raise APIError(400, "streaming takes one prompt per request", param="prompt")
            return await self._sse(request, calls[0], rid, StreamWriter(fmt, chat=False, prompt_text=texts[0]))
        timings = [RequestTiming(self.metrics) for _ in calls]
        tasks = [asyncio.ensure_future(self._run_to_end(request, c, t)) for c, t in zip(calls, timings)]
        try:
            finals = await asyncio.gather(*tasks)
        finally:  # one prompt failed (or the client left): the others' requests are aborted, not left running
            for task in tasks:
                task.cancel()
        choices, prompt_tokens, completion_tokens, cached = [], 0, 0, 0
        for i, out in enumerate(finals):
            prompt_tokens += len(out.prompt_token_ids)
            cached += out.num_cached_tokens
            completion_tokens += fmt.completion_tokens(out)
            choices += [fmt.completion_choice(i * params.n + c.index, out, c, texts[i]) for c in out.outputs]
        for t in timings:
            t.done()
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.served_model_name,
                "choices": choices, "usage": usage(prompt_tokens, completion_tokens, cached)}

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self._check_model(body.model)
        params = body.sampling_params(self.default_max_tokens)
        fmt = Formatter(self.tokenizer, body.response_shape())
        tools = ChatTools.of(body, self.tool_parser, self.tokenizer)  # tools rendered; calls parsed out below
        ids = await self._chat_ids(tools.template_conversation(body.conversation()), body.add_generation_prompt,
                                   tools.template_kwargs(body.template_kwargs()),
                                   check_head=body.truncate_prompt_tokens is None)
        explicit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        ids = body.truncate(ids, self.max_model_len, explicit)
        self._check_context(len(ids), explicit, "messages",
                            "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens")
        rid = body.request_id or f"chatcmpl-{uuid.uuid4().hex}"
        call = GenerateCall(rid, ids, params, self._salt(request, body.cache_salt), stream=body.stream)
        if body.stream:
            return tools.wrap_stream(await self._sse(request, call, rid, StreamWriter(fmt, chat=True)))
        timing = RequestTiming(self.metrics)
        out = await self._run_to_end(request, call, timing)
        timing.done()
        return tools.rewrite({"id": rid, "object": "chat.completion", "created": int(time.time()),
                              "model": self.served_model_name, "choices": [fmt.chat_choice(c) for c in out.outputs],
                              "usage": usage(len(out.prompt_token_ids), fmt.completion_tokens(out),
                                             out.num_cached_tokens), **fmt.chat_extras(out)})


# ---------------------------------------------------------------- the HTTP app of one server

_STREAMED = {200: {"content": {"application/json": {}, "text/event-stream": {}}}}  # SSE with stream=true


_GENERATION_PATHS = frozenset(("/v1/completions", "/v1/chat/completions", "/invocations"))  # /load counts these


def build_api(server: OpenAIServer) -> FastAPI:
    """A new FastAPI app serving `server`: its routes, and its API keys checked by its own middleware.
    Nothing is shared between the apps of two servers."""
    api = FastAPI(title="raylight", version=__version__, responses=ERROR_RESPONSES)
    # inside the Guard: a refused request is no load
    api.add_middleware(LoadCounter, holder=server, paths=_GENERATION_PATHS)
    api.add_middleware(Guard, api_keys=server.api_keys, max_body=server.max_request_body_bytes)

    api.add_exception_handler(APIError, api_error)
    api.add_exception_handler(StarletteHTTPException, http_error)
    api.add_exception_handler(RequestValidationError, validation_error)
    api.add_exception_handler(Exception, internal_error)

    @api.get("/health", response_class=Response, responses={200: {"description": "ready (empty body)",
                                                                  "content": {}}})
    async def health():
        return await server.health()

    @api.get("/version")
    async def version():
        return await server.version()

    @api.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return await server.render_metrics()

    @api.get("/v1/models")
    async def models():
        return await server.list_models()

    @api.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        return await server.tokenize(body)

    @api.get("/tokenizer_info")
    async def tokenizer_info():
        return await server.tokenizer_info()

    @api.get("/load")
    async def load():
        return await server.load()

    @api.post("/invocations", responses=_STREAMED)
    async def invocations(request: Request):
        return await server.invocations(request)

    @api.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return await server.detokenize(body)

    @api.post("/v1/completions", responses=_STREAMED)
    async def completions(body: CompletionRequest, request: Request):
        return await server.completions(body, request)

    @api.post("/v1/chat/completions", responses=_STREAMED)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await server.chat_completions(body, request)

    return api


# ---------------------------------------------------------------- the Serve deployment

@serve.ingress()  # no app: Serve asks each replica's instance for its own (__serve_build_asgi_app__)
class OpenAIIngress(OpenAIServer):
    """The Serve ingress deployment: resolves the model and loads its tokenizer, then is an
    `OpenAIServer`. Its bind arguments are the ones `raylight.cluster.app.build_app` passes."""

    def __init__(self, engine_handle, served_model_name: str, model: Optional[str], load_format: str = "auto",
                 max_model_len: Optional[int] = None, api_key: Optional[str] = None,
                 default_max_tokens: int = 256, api_keys: Sequence[str] = (),
                 max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES, tool_call_parser: Optional[str] = None,
                 share_metrics: bool = False, gc_freeze: bool = False):
        """`share_metrics`: the app runs several ingress replicas, which pool their request metrics.
        `gc_freeze`: once built, its start-up objects leave the garbage collector's walks (utils/gc_heap.py)."""
        from raylight.cluster.serve_mode import replica_handle
        from raylight.engine.tokenizer import load_tokenizer
        from raylight.models.loader import resolve_model

        resolved = resolve_model(model, load_format)
        super().__init__(replica_handle(engine_handle), served_model_name, load_tokenizer(resolved.path),
                         max_model_len or resolved.arch.max_position_embeddings, api_key, default_max_tokens,
                         api_keys=api_keys, max_request_body_bytes=max_request_body_bytes,
                         tool_call_parser=tool_call_parser)
        if share_metrics:
            from raylight.cluster.ingress_peers import PeerLink

            ctx = serve.get_replica_context()
            self.peers = PeerLink(ctx.app_name, ctx.replica_id.unique_id, self.metrics)
        if gc_freeze:
            from raylight.utils.gc_heap import freeze_heap

            freeze_heap("ingress")
