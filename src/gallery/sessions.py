"""Server-side sessions in Redis, with a fresh session id whenever a user signs in."""

from __future__ import annotations

import secrets
from typing import Any

from litestar.connection import ASGIConnection
from litestar.middleware.session.server_side import (
    ServerSideSessionBackend,
    ServerSideSessionConfig,
)
from litestar.types import Message, ScopeSession


class RotatingSessionBackend(ServerSideSessionBackend):
    """Store sessions server-side, moving to a new id when a handler sets `rotate_session`.

    Litestar keeps the id from the request's cookie for as long as it exists, so without the
    move an id that an attacker planted before sign-in would carry the signed-in session.
    """

    async def store_in_message(
        self,
        scope_session: ScopeSession,
        message: Message,
        connection: ASGIConnection[Any, Any, Any, Any],
    ) -> None:
        state = connection.scope.setdefault("state", {})
        if state.pop("rotate_session", False):
            old_id = connection.cookies.get(self.config.key)
            if old_id:
                await self.delete(old_id, store=self.config.get_store_from_app(connection.app))
            state["new_session_id"] = secrets.token_hex(self.config.session_id_bytes)
        await super().store_in_message(scope_session, message, connection)

    def get_session_id(self, connection: ASGIConnection[Any, Any, Any, Any]) -> str:
        new_id = connection.scope.get("state", {}).get("new_session_id")
        return new_id or super().get_session_id(connection)


class RotatingSessionConfig(ServerSideSessionConfig):
    _backend_class = RotatingSessionBackend
