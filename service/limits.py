"""Bounds on what one request may cost the gateway, enforced below the routes (ASGI middleware), so a new
route can never be left without them:

- BodyLimitMiddleware: every body is counted as it arrives, chunked or not (413 past the limit: uploads
  GRAPE_MAX_BODY_BYTES, every other route GRAPE_MAX_REQUEST_BYTES). A non-upload body must be JSON
  (415 otherwise) that orjson accepts: no NaN, no Infinity, no number that overflows to infinity, no lone
  surrogate, valid UTF-8 (422 otherwise), so no such value reaches a route, Redis or an answer.
- FollowLimitMiddleware: at most GRAPE_MAX_LOG_FOLLOWERS `?follow=true` log streams (training jobs and
  evaluations together) per API key (the key that matched, however its header was spelled), per client
  address without keys (429).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

import orjson
from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.deps import Slots
from service.errors import send_error

UPLOAD_PATH = re.compile(r"/v1/datasets/[^/]+/items")
FOLLOW_PATH = re.compile(r"/v1/(?:training-jobs|evaluations)/[^/]+/logs")
_FALSE = {"", "0", "false", "f", "no", "n", "off"}


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a streamed body passes its limit; an HTTPException, so whichever layer
    is reading the body at that moment answers 413."""

    def __init__(self, limit: int, setting: str) -> None:
        super().__init__(413, f"body is over {limit} bytes ({setting})")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def is_upload(method: str, path: str) -> bool:
    return method == "POST" and UPLOAD_PATH.fullmatch(path) is not None


def _is_json(content_type: str) -> bool:
    ctype = content_type.split(";")[0].strip().lower()
    return ctype == "application/json" or (ctype.startswith("application/") and ctype.endswith("+json"))


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, upload_limit: int, request_limit: int) -> None:
        self.app = app
        self.upload_limit = upload_limit
        self.request_limit = request_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = is_upload(scope["method"], scope["path"])
        limit, setting = (
            (self.upload_limit, "GRAPE_MAX_BODY_BYTES") if upload else (self.request_limit, "GRAPE_MAX_REQUEST_BYTES")
        )
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            await send_error(send, 413, f"body is {int(declared)} bytes, limit {limit} ({setting})")
            return
        if upload:
            # the upload route streams the body itself (and parses it with orjson): count as it goes
            await self._counted(scope, receive, send, limit, setting)
            return
        body = await _read(receive, limit, setting)
        if body is None:
            await send_error(send, 413, f"body is over {limit} bytes ({setting})")
            return
        if body.strip():
            ctype = _header(scope, b"content-type") or ""
            if not _is_json(ctype):
                shown = ctype[:64] or "(none)"
                await send_error(send, 415, f"Content-Type {shown!r} is not accepted: send application/json")
                return
            try:
                orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                detail = f"body is not valid JSON ({exc}); NaN, Infinity, out-of-range numbers are refused"
                await send_error(send, 422, detail)
                return
        await self.app(scope, _replay(body, receive), send)

    async def _counted(self, scope: Scope, receive: Receive, send: Send, limit: int, setting: str) -> None:
        size = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > limit:
                    raise BodyTooLarge(limit, setting)
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except BodyTooLarge as exc:  # nobody above answered it (it escaped the route's handlers)
            if started:
                raise
            await send_error(send, 413, str(exc.detail))


async def _read(receive: Receive, limit: int, setting: str) -> bytes | None:
    """The whole body, or None as soon as it passes `limit`."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client left: let the app see an empty request
            return b"".join(parts)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the app the body already read, then passes on (e.g. http.disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class FollowLimitMiddleware:
    """`GET /v1/training-jobs/{id}/logs?follow=true` holds a connection (and polls Redis) until the job
    ends: at most `limit` at once per API key (per client address on a gateway without keys). The key is the
    one service.auth matched (its identity on the scope), never the header's text: `bearer K`, `Bearer  K`
    and `BEARER K` are the same key and share its slots. The slot is freed when the response ends, however it
    ends (job done, client gone, error)."""

    def __init__(self, app: ASGIApp, *, limit: int, keyed: bool, slots: Slots | None = None) -> None:
        self.app = app
        self.keyed = keyed
        self.slots = slots or Slots(limit)

    def _who(self, scope: Scope) -> str:
        who = scope.get("state", {}).get("identity")
        if self.keyed and who is not None:
            return f"key:{who.key_id}"
        client = scope.get("client")
        return f"addr:{client[0]}" if client else "addr:"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _follows(scope):
            await self.app(scope, receive, send)
            return
        who = self._who(scope)
        if not self.slots.try_acquire(who):
            detail = (
                f"{self.slots.limit} log streams are already followed with this API key "
                "(GRAPE_MAX_LOG_FOLLOWERS); close one, or read without follow"
            )
            await send_error(send, 429, detail, headers={"Retry-After": "5"})
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.slots.release(who)


def _follows(scope: Scope) -> bool:
    if scope["method"] != "GET" or FOLLOW_PATH.fullmatch(scope["path"]) is None:
        return False
    query = scope.get("query_string", b"").decode("latin-1")
    return any(k == "follow" and v.strip().lower() not in _FALSE for k, v in parse_qsl(query, keep_blank_values=True))
