"""Bearer-token API keys for every /v1 route, who they make the caller, and the Host check of a gateway
without keys.

A key belongs to a tenant (`GRAPE_API_KEYS` entries `tenant:key`; a bare key is tenant `default`); an
operator key (`GRAPE_ADMIN_KEYS`) sees and manages every tenant. The middleware resolves the bearer key to an
`Identity` (tenant, admin, which key) and leaves it on the ASGI scope (`scope["state"]["identity"]`), where
routes read it (service.tenancy.identity) and the follow limit counts by it. Without keys, every request is
the one local user: tenant `default`, admin.

With no key configured the gateway is for local use (it binds 127.0.0.1 unless told otherwise). Such a
gateway answers only requests addressed to it by a local name (LocalHostMiddleware): a web page on another
site that makes the browser resolve its own name to 127.0.0.1 (DNS rebinding) sends its own name in
`Host` and is refused. Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from grape.tenancy import LOCAL, Identity
from service.errors import send_error

PROTECTED_PREFIX = "/v1"


class KeyTable:
    """The configured keys (grape.settings.Settings.key_entries) and the identity each one gives."""

    def __init__(self, entries: list[tuple[str, str, bool]]) -> None:
        # the key id names the entry, never the key: limits count by it, logs may show it
        self.entries = [
            (key.encode(), Identity(tenant, admin, f"key-{i}")) for i, (tenant, key, admin) in enumerate(entries)
        ]

    def __bool__(self) -> bool:
        return bool(self.entries)

    def resolve(self, header: str | None) -> Identity | None:
        """The identity of the key in an `Authorization: Bearer <key>` header (any case of `Bearer`, spaces
        around the key ignored), or None. Every key is compared, each in constant time: how long it takes says
        nothing about which key (or how much of one) matched."""
        if not header or not header.lower().startswith("bearer "):
            return None
        given = header[7:].strip().encode()
        found: Identity | None = None
        for key, who in self.entries:
            hit = hmac.compare_digest(given, key)
            found = who if hit else found
        return found


class ApiKeyMiddleware:
    """Applied by path rather than per router, so a new /v1 router can never be left open by mistake. A request
    outside /v1 with a valid key gets its identity too (routes there may show more to a key holder)."""

    def __init__(self, app: ASGIApp, table: KeyTable) -> None:
        self.app = app
        self.table = table

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if not self.table:
                who: Identity | None = LOCAL
            else:
                header = None
                for name, value in scope["headers"]:
                    if name == b"authorization":
                        header = value.decode("latin-1")
                        break
                who = self.table.resolve(header)
                if who is None and scope["path"].startswith(PROTECTED_PREFIX):
                    await _unauthorized(send)
                    return
            if who is not None:
                scope.setdefault("state", {})["identity"] = who
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


LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def host_name(header: str) -> str:
    """The name part of a Host header, lower case, without port or brackets: `[::1]:8000` -> `::1`."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    name, colon, port = value.rpartition(":")
    name = name if colon and port.isdigit() else value
    return name.rstrip(".")


class LocalHostMiddleware:
    """Installed only on a gateway without API keys: a `Host` other than the loopback names, the bind
    address and GRAPE_ALLOWED_HOSTS is refused (400) on every path. A request with no Host (HTTP/1.0
    tools) is let through: a browser always sends one."""

    def __init__(self, app: ASGIApp, allowed: set[str]) -> None:
        self.app = app
        self.allowed = {host_name(h) for h in allowed} | LOCAL_NAMES

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            host = None
            for name, value in scope["headers"]:
                if name == b"host":
                    host = value.decode("latin-1")
                    break
            if host is not None and host_name(host) not in self.allowed:
                shown = host if len(host) <= 64 else host[:64] + "..."
                detail = (
                    f"Host {shown!r} is not served: this gateway has no API keys, so it answers only local names "
                    "(localhost, 127.0.0.1, [::1], GRAPE_HOST); add the name to GRAPE_ALLOWED_HOSTS, or set "
                    "GRAPE_API_KEYS"
                )
                if scope["type"] == "http":
                    await send_error(send, 400, detail)
                return
        await self.app(scope, receive, send)
