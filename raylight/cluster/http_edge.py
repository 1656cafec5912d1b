"""The HTTP edge of the ingress, shared by every server's app: OpenAI-shaped errors for every
failure (our APIError, FastAPI's validation and body-parsing errors, Starlette's 404/405, anything
unhandled), and `Guard`, the pure ASGI middleware that checks API keys in constant time (each key is
a tenant with its own prefix-cache salt), caps request bodies (413) before they are read whole, and
refuses requests with too many or too large headers (431)."""

# No `from __future__ import annotations`: FastAPI reads handler signatures at runtime.

import hashlib
import hmac
import logging
import re
from typing import Optional, Sequence

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from raylight.cluster.protocol import APIError, ErrorResponse

logger = logging.getLogger("raylight.ingress")

DEFAULT_MAX_REQUEST_BODY_BYTES = 16 * 1024 * 1024
# Header limits (CVE-2025-48956: one huge header exhausted vLLM's memory). Ray Serve's HTTP proxy runs
# uvicorn with httptools, which has no limit on the size or number of headers (a 10 MB header or 100,000
# headers reach the app): the ingress refuses them here, before auth and before any route. vLLM's h11
# limits are 4 MB and 256 headers; browsers and proxies (nginx, Node) stop at 8-80 KB.
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADER_COUNT = 256
_SALT_KEY = b"raylight prefix-cache salt v1"


_ADDRESS = re.compile(r"0x[0-9a-fA-F]{4,}")
_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?[/\\](?:[\w.\-]+[/\\])+[\w.\-]*")


def sanitize(message: str) -> str:
    """An error text fit for a client: no memory addresses, no file paths, no traceback frames
    (CVE-2026-22778)."""
    message = message.split("Traceback (most recent call last)", 1)[0]
    return _PATH.sub("<path>", _ADDRESS.sub("<address>", message)).strip()[:1000]


def tenant_salt(api_key: str) -> str:
    """The prefix-cache salt of the tenant holding `api_key`: a keyed hash, never the key."""
    return hmac.new(_SALT_KEY, api_key.encode(), hashlib.sha256).hexdigest()


def combine_salts(tenant: Optional[str], client: Optional[str]) -> Optional[str]:
    """A tenant's salt joined with the salt its client sent: one tenant cannot reach another's
    cache entries by sending the other's client salt."""
    if tenant is None:
        return client
    return tenant if client is None else hashlib.sha256(f"{tenant}\0{client}".encode()).hexdigest()


def context_error(max_model_len: int, prompt_tokens: int, completion_tokens: int, param: str,
                  lower_bound: bool = False) -> APIError:
    more = "more than " if lower_bound else ""
    return APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                         f"{more}{prompt_tokens + completion_tokens} tokens ({more}{prompt_tokens} in the messages, "
                         f"{completion_tokens} in the completion). Please reduce the length of the messages or "
                         f"completion.", param=param, code="context_length_exceeded")



def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _unauthorized() -> JSONResponse:
    return _error_response(APIError(401, "invalid or missing API key", "authentication_error",
                                    code="invalid_api_key"))


def _headers_too_large(count: int, size: int, max_count: int, max_bytes: int) -> JSONResponse:
    what = (f"{count} request headers (at most {max_count})" if count > max_count
            else f"request headers of {size} bytes (at most {max_bytes})")
    return _error_response(APIError(431, f"{what}: request header fields too large", param=None,
                                    code="request_header_fields_too_large"))


def _too_large(limit: int) -> JSONResponse:
    return _error_response(APIError(413, f"request body is larger than {limit} bytes", param=None,
                                    code="request_too_large"))


async def api_error(_: Request, exc: APIError):
    return _error_response(exc)


_HTTP_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}


async def http_error(_: Request, exc: StarletteHTTPException):
    """404 (no such route), 405 (wrong method), FastAPI's body-parsing 400s: OpenAI's shape."""
    message = exc.detail if isinstance(exc.detail, str) else "invalid request"
    err = APIError(exc.status_code, message, _HTTP_ERROR_TYPES.get(exc.status_code, "invalid_request_error"),
                   headers=dict(exc.headers or {}) or None)
    return _error_response(err)


def _field_path(loc) -> Optional[str]:
    """The request field an error is about, dotted ("messages.0.role"); pydantic's union-member
    tags ("str", "list[int]", "function-after[...]") are not fields and end the path."""
    parts = []
    for p in loc:
        if p == "body" and not parts:
            continue
        if isinstance(p, str) and (not p.isidentifier() or p in {"str", "int", "float", "bool", "list", "dict"}):
            break
        parts.append(str(p))
    return ".".join(parts) or None


async def validation_error(_: Request, exc: RequestValidationError):
    errors = exc.errors()
    err = errors[0] if errors else {}
    if err.get("type") == "json_invalid":  # loc holds a character offset, not a field
        ctx = err.get("ctx") or {}
        msg = f"request body is not valid JSON ({ctx.get('error', 'parse error')})"
        return _error_response(APIError(400, msg))
    param = _field_path(err.get("loc", ()))
    msg = f"{param or 'body'}: {err.get('msg', 'invalid request')}"
    return _error_response(APIError(400, msg, param=param))


async def internal_error(_: Request, exc: Exception):
    logger.exception("unhandled error")
    return _error_response(APIError(500, "internal server error", "internal_error"))


class Guard:
    """Pure ASGI middleware in front of every route: the API key first (constant time over all
    keys; the matching key's prefix-cache salt goes into the scope), then the body size limit:
    Content-Length over the limit is refused before any byte is read, and a chunked body is counted
    as it arrives and refused as soon as it passes the limit (never read whole). Before both: more
    than `max_header_count` headers, or headers (names and values) over `max_header_bytes` in all,
    get 431 on every path."""

    _OPEN = frozenset(("/health",))

    def __init__(self, app, api_keys: Sequence[str], max_body: int, max_header_bytes: int = MAX_HEADER_BYTES,
                 max_header_count: int = MAX_HEADER_COUNT):
        self.app = app
        self.digests = [(hashlib.sha256(k.encode()).digest(), tenant_salt(k)) for k in api_keys]
        self.max_body = max_body
        self.max_header_bytes, self.max_header_count = max_header_bytes, max_header_count

    def _tenant(self, scope) -> tuple[bool, Optional[str]]:
        header = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                header = value
                break
        token = header[7:] if header[:7].lower() == b"bearer " else b""
        presented = hashlib.sha256(token).digest()
        ok, salt = False, None
        for digest, s in self.digests:  # no early exit: the time does not tell which key matched
            match = hmac.compare_digest(presented, digest)
            ok |= match
            salt = s if match else salt
        return ok, salt

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers", ())
        count, size = len(headers), sum(len(n) + len(v) for n, v in headers)
        if count > self.max_header_count or size > self.max_header_bytes:
            return await _headers_too_large(count, size, self.max_header_count, self.max_header_bytes)(
                scope, receive, send)
        if self.digests and scope["path"] not in self._OPEN:
            ok, salt = self._tenant(scope)
            if not ok:
                return await _unauthorized()(scope, receive, send)
            scope["raylight.tenant_salt"] = salt
        length = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    return await _error_response(APIError(400, "bad Content-Length header"))(scope, receive, send)
        if length is not None and length > self.max_body:
            return await _too_large(self.max_body)(scope, receive, send)
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE") and not length:
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await _too_large(self.max_body)(scope, receive, send)
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        return await self.app(scope, replayed, send)


ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 431, 500, 503)}


class LoadCounter:
    """Pure ASGI middleware: counts the requests in flight on `paths` into `holder.server_load` (vLLM's
    /load), a stream until its last byte; ASGI-level, so it sees a request end however it ends."""

    def __init__(self, app, holder, paths: frozenset):
        self.app, self.holder, self.paths = app, holder, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        self.holder.server_load += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.holder.server_load -= 1
