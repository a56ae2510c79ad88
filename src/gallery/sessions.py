"""Server-side sessions in Redis: stored only for signed-in users, renewed at each sign-in."""

from __future__ import annotations

import json
import secrets
from typing import Any

from litestar.connection import ASGIConnection
from litestar.datastructures import Cookie, MutableScopeHeaders
from litestar.middleware.session.server_side import (
    ServerSideSessionBackend,
    ServerSideSessionConfig,
)
from litestar.types import Empty, Message, ScopeSession
from litestar.utils.dataclass import extract_dataclass_items
from redis.asyncio import Redis

# The Redis namespace of the session store: each session is the key `gallery:sessions:<id>`,
# with the session's data as JSON.
SESSION_NAMESPACE = "gallery:sessions"
# Sessions read with one MGET while looking for a user's sessions.
SESSION_SCAN_BATCH = 500


class SessionBackend(ServerSideSessionBackend):
    """Litestar's server-side sessions with three changes.

    An empty session is neither stored nor sent as a cookie, so anonymous visitors leave no
    key in Redis. A handler that sets `rotate_session` in the request state moves the
    session to a new id. Litestar keeps the id from the request's cookie while the cookie
    exists, so without the move an id planted before sign-in would carry the new session.
    A removed session's cookie gets Max-Age=0. Litestar 2.25 sends it with the configured
    Max-Age, which takes precedence over its past `expires` date (RFC 6265, section 5.3),
    so browsers would keep a `session=null` cookie for the 14 days of `max_age`.
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
                await self._remove_session(message, connection)
            return

        state = connection.scope.setdefault("state", {})
        if state.pop("rotate_session", False):
            if has_cookie:
                store = self.config.get_store_from_app(connection.app)
                await self.delete(connection.cookies[self.config.key], store=store)
            state["new_session_id"] = secrets.token_hex(self.config.session_id_bytes)
        await super().store_in_message(scope_session, message, connection)

    async def _remove_session(
        self, message: Message, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> None:
        store = self.config.get_store_from_app(connection.app)
        await self.delete(connection.cookies[self.config.key], store=store)
        cookie_params = dict(
            extract_dataclass_items(self.config, exclude_none=True, include=Cookie.__dict__.keys())
        )
        cookie_params.update(max_age=0, expires=0)
        expired = Cookie(key=self.config.key, value="", **cookie_params)
        MutableScopeHeaders.from_message(message).add("Set-Cookie", expired.to_header(header=""))

    def get_session_id(self, connection: ASGIConnection[Any, Any, Any, Any]) -> str:
        new_id = connection.scope.get("state", {}).get("new_session_id")
        return new_id or super().get_session_id(connection)


class SessionConfig(ServerSideSessionConfig):
    _backend_class = SessionBackend


async def end_user_sessions(redis: Redis, user_id: str) -> int:
    """Delete every session signed in as this user; return how many there were.

    Scans all sessions, so it is for admin commands, not for requests.
    """
    ended = 0
    batch: list[bytes] = []
    async for key in redis.scan_iter(f"{SESSION_NAMESPACE}:*", count=1000):
        batch.append(key)
        if len(batch) == SESSION_SCAN_BATCH:
            ended += await _delete_sessions_of(redis, user_id, batch)
            batch = []
    if batch:
        ended += await _delete_sessions_of(redis, user_id, batch)
    return ended


async def _delete_sessions_of(redis: Redis, user_id: str, keys: list[bytes]) -> int:
    values = await redis.mget(keys)
    owned = [
        key for key, value in zip(keys, values, strict=True) if _session_user(value) == user_id
    ]
    if owned:
        await redis.delete(*owned)
    return len(owned)


def _session_user(value: bytes | None) -> str | None:
    try:
        data = json.loads(value) if value else None
    except ValueError:
        return None
    return data.get("user_id") if isinstance(data, dict) else None
