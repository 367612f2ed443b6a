"""Bearer tokens, checked one way for every face: /v1 and the compile-cache API (admin token),
the peer API (cluster token), the mirror (admin token lifts its allow-list)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def bearer_matches(header: str | None, token: str) -> bool:
    """`Authorization: Bearer <token>` (the scheme word optional), compared in constant time."""
    given = (header or "").removeprefix("Bearer ").strip()
    return hmac.compare_digest(given.encode(), token.encode())


def admin_only(token: str | None) -> Callable[[Handler], Handler]:
    """A route wrapper: with an admin token configured, 401 unless the request carries it."""

    def wrap(handler: Handler) -> Handler:
        async def checked(request: web.Request) -> web.StreamResponse:
            if token and not bearer_matches(request.headers.get("Authorization"), token):
                raise web.HTTPUnauthorized(
                    reason="admin token required", text="Authorization: Bearer <admin token> required"
                )
            return await handler(request)

        return checked

    return wrap


def check_bearer(request: web.Request, token: str | None, what: str) -> None:
    """401 unless the request carries `token`; with no token configured the face is closed (403)."""
    if not token:
        raise web.HTTPForbidden(reason="peer_api_disabled", text=f"{what} is off: this node has no cluster_token")
    if not bearer_matches(request.headers.get("Authorization"), token):
        raise web.HTTPUnauthorized(reason="cluster token required", text=f"{what} needs the cluster token")
