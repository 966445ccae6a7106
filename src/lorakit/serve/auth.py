"""API keys (vLLM's convention): with `--api-key` (or LORAKIT_API_KEY) every endpoint but GET /health needs
`Authorization: Bearer <key>`; with `--admin-api-key` the adapter endpoints (load, unload, delete) need that key
instead (it opens every other endpoint too). Wrong or missing key: 401, OpenAI-style, `WWW-Authenticate: Bearer`.

A browser cannot send a Bearer header when it opens the playground, so the 401 answer to an HTML page is a small
form that asks for the key once; `GET /?api_key=KEY` with the right key stores it in an HttpOnly, same-site
cookie, which the page's own requests then carry. Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
import json
from urllib.parse import parse_qs

from .admin_routes import ADMIN_PREFIXES, ADMIN_ROUTES

COOKIE = "lorakit_api_key"
OPEN_PATHS = {"/health"}
KEY_FORM = (b"<!doctype html><html><head><meta charset='utf-8'><title>lorakit: API key</title></head><body>"
            b"<form method='get' action='/'><label for='api_key'>API key for this lorakit server</label> "
            b"<input id='api_key' name='api_key' type='password' autofocus> <button>Open</button></form>"
            b"</body></html>")


def is_admin_route(method: str, path: str) -> bool:
    return (method, path) in ADMIN_ROUTES or any(method == m and path.startswith(p) for m, p in ADMIN_PREFIXES)


def _presented_keys(scope) -> list[str]:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    keys = []
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token:
        keys.append(token.strip())
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE and value:
            keys.append(value)
    return keys


def _matches(keys: list[str], expected: str | None) -> bool:
    return expected is not None and any(hmac.compare_digest(k.encode(), expected.encode()) for k in keys)


class ApiKeyMiddleware:
    """Pure ASGI (streams and client-disconnect detection pass through untouched)."""

    def __init__(self, app, api_key: str | None, admin_api_key: str | None):
        self.app, self.api_key, self.admin_api_key = app, api_key, admin_api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        keys = _presented_keys(scope)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        login = path == "/" and method == "GET" and query.get("api_key")
        if login:
            keys.append(query["api_key"][0])
        admin = is_admin_route(method, path)
        needed = self.admin_api_key if admin and self.admin_api_key else self.api_key
        if needed is None or _matches(keys, needed) or _matches(keys, self.admin_api_key):
            if login:  # remember the key for the page's own requests
                return await _redirect_home(send, query["api_key"][0])
            return await self.app(scope, receive, send)
        await _unauthorized(scope, send, admin and self.admin_api_key is not None)


async def _redirect_home(send, key: str) -> None:
    cookie = f"{COOKIE}={key}; HttpOnly; SameSite=Strict; Path=/".encode("latin-1")
    await send({"type": "http.response.start", "status": 303,
                "headers": [(b"location", b"/"), (b"set-cookie", cookie), (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


async def _unauthorized(scope, send, admin: bool) -> None:
    accept = dict(scope.get("headers", [])).get(b"accept", b"")
    if scope["method"] == "GET" and b"text/html" in accept:
        body, kind = KEY_FORM, b"text/html; charset=utf-8"
    else:
        what = "the admin API key (--admin-api-key)" if admin else "an API key"
        body = json.dumps({"error": {"message": f"this endpoint needs {what}: send 'Authorization: Bearer <key>'",
                                     "type": "authentication_error", "param": None,
                                     "code": "invalid_api_key"}}).encode()
        kind = b"application/json"
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", kind), (b"www-authenticate", b"Bearer"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def add_auth(app, api_key: str | None, admin_api_key: str | None) -> None:
    """Wrap `app` when a key is set (without keys every endpoint is open, as before)."""
    if api_key or admin_api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key or None, admin_api_key=admin_api_key or None)
