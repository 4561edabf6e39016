"""Bearer-token API keys for every /v1 route.

With no key configured the gateway is for local use (it binds 127.0.0.1 unless told otherwise).
Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

PROTECTED_PREFIX = "/v1"


def key_ok(header: str | None, keys: list[str]) -> bool:
    if not header or not header.lower().startswith("bearer "):
        return False
    given = header[7:].strip().encode()
    # compare against every key (no early exit), each in constant time
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(given, k.encode())
    return ok


class ApiKeyMiddleware:
    """Applied by path rather than per router, so a new /v1 router can never be left open by mistake."""

    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.keys and scope["path"].startswith(PROTECTED_PREFIX):
            header = None
            for name, value in scope["headers"]:
                if name == b"authorization":
                    header = value.decode("latin-1")
                    break
            if not key_ok(header, self.keys):
                await _unauthorized(send)
                return
        await self.app(scope, receive, send)


async def _unauthorized(send: Send) -> None:
    body = b'{"detail":"missing or invalid API key: send Authorization: Bearer <key>"}'
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"www-authenticate", b"Bearer"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
