"""Server-side sessions in Redis: stored only for signed-in users, renewed at each sign-in."""

from __future__ import annotations

import secrets
from typing import Any

from litestar.connection import ASGIConnection
from litestar.middleware.session.server_side import (
    ServerSideSessionBackend,
    ServerSideSessionConfig,
)
from litestar.types import Empty, Message, ScopeSession


class SessionBackend(ServerSideSessionBackend):
    """Litestar's server-side sessions with two changes.

    An empty session is neither stored nor sent as a cookie, so anonymous visitors leave no
    key in Redis. A handler that sets `rotate_session` in the request state moves the
    session to a new id. Litestar keeps the id from the request's cookie while the cookie
    exists, so without the move an id planted before sign-in would carry the new session.
    """

    async def store_in_message(
        self,
        scope_session: ScopeSession,
        message: Message,
        connection: ASGIConnection[Any, Any, Any, Any],
    ) -> None:
        has_cookie = bool(connection.cookies.get(self.config.key))
        if scope_session is Empty or not scope_session:
            if has_cookie:
                await super().store_in_message(Empty, message, connection)
            return

        state = connection.scope.setdefault("state", {})
        if state.pop("rotate_session", False):
            if has_cookie:
                store = self.config.get_store_from_app(connection.app)
                await self.delete(connection.cookies[self.config.key], store=store)
            state["new_session_id"] = secrets.token_hex(self.config.session_id_bytes)
        await super().store_in_message(scope_session, message, connection)

    def get_session_id(self, connection: ASGIConnection[Any, Any, Any, Any]) -> str:
        new_id = connection.scope.get("state", {}).get("new_session_id")
        return new_id or super().get_session_id(connection)


class SessionConfig(ServerSideSessionConfig):
    _backend_class = SessionBackend
