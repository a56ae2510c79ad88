"""Accounts: users stored in Redis, argon2id password hashes, and sign-up, sign-in, sign-out."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlsplit

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from litestar import Request, Router, get, post
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.exceptions import NotAuthorizedException
from litestar.handlers import BaseRouteHandler
from litestar.params import Body, FromQuery, QueryParameter
from litestar.response import Redirect, Template
from litestar.status_codes import (
    HTTP_303_SEE_OTHER,
    HTTP_403_FORBIDDEN,
    HTTP_429_TOO_MANY_REQUESTS,
)
from redis.asyncio import Redis

from gallery import limits
from gallery.index import PREFIX
from gallery.settings import Settings

logger = logging.getLogger(__name__)

USERNAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{3,32}")
MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 256
# Longer input cannot be a valid username; it is cut before it is logged or counted.
MAX_USERNAME_INPUT = 64
SIGNIN_WINDOW_SECONDS = 15 * 60
# The maximum length of the page address that sign-in returns to. Sign-in goes to the
# gallery instead of a longer one.
MAX_NEXT_LENGTH = 2000

_hasher = PasswordHasher()
# Verified against when a username is unknown, so both cases cost one argon2 hash.
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))


class AccountError(ValueError):
    """A sign-up or sign-in that cannot go ahead; the message is shown to the user."""


class AccountDisabled(AccountError):
    """The password is right, but an administrator disabled the account."""

    def __init__(self) -> None:
        super().__init__("This account is disabled. Ask the gallery's administrator to enable it.")


@dataclass(frozen=True)
class User:
    id: str
    username: str


def _user_key(user_id: str) -> str:
    return f"{PREFIX}:user:{user_id}"


def _username_key(username: str) -> str:
    return f"{PREFIX}:username:{username.lower()}"


def check_new_credentials(username: str, password: str) -> None:
    """Raise AccountError when a username or password may not be used for a new account."""
    # A name of punctuation alone, such as "...", reads as no name at all.
    if not USERNAME_PATTERN.fullmatch(username) or not any(char.isalnum() for char in username):
        raise AccountError(
            "Choose a username of 3 to 32 letters, digits, dots, dashes or underscores,"
            " with at least one letter or digit."
        )
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise AccountError(
            f"Choose a password of {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters."
        )


async def create_user(redis: NamedDependency[Redis], username: str, password: str) -> User:
    """Store a new user with an argon2id hash of the password."""
    check_new_credentials(username, password)
    user = User(id=secrets.token_hex(8), username=username)
    password_hash = await asyncio.to_thread(_hasher.hash, password)
    # SET NX claims the username atomically, so two sign-ups cannot both take it.
    if not await redis.set(_username_key(username), user.id, nx=True):
        raise AccountError("That username is taken. Choose another one.")
    await redis.hset(
        _user_key(user.id),
        mapping={"username": username, "password_hash": password_hash, "created_at": time.time()},
    )
    logger.info("created user %s", user.id)
    return user


async def find_user_id(redis: Redis, username: str) -> str | None:
    """Return the id of the user with this username, or None when there is none."""
    user_id = await redis.get(_username_key(username))
    return user_id.decode() if user_id else None


async def authenticate(redis: NamedDependency[Redis], username: str, password: str) -> User | None:
    """Return the user when the password matches, otherwise None.

    Raises AccountDisabled when the password matches a disabled account, so only someone
    with the password learns that the account exists and is disabled.
    """
    user_id = await redis.get(_username_key(username)) if username else None
    stored = await redis.hget(_user_key(user_id.decode()), "password_hash") if user_id else None
    password_hash = stored.decode() if stored else _DUMMY_HASH
    try:
        await asyncio.to_thread(_hasher.verify, password_hash, password[:MAX_PASSWORD_LENGTH])
    except (VerificationError, InvalidHashError):
        return None
    if not user_id:
        return None
    # Read after the hash, which takes tens of milliseconds, so a `gallery users disable`
    # that ran meanwhile is seen here.
    name, disabled_at = await redis.hmget(_user_key(user_id.decode()), "username", "disabled_at")
    if disabled_at:
        raise AccountDisabled()
    return User(id=user_id.decode(), username=name.decode())


async def is_disabled(redis: Redis, user_id: str) -> bool:
    return bool(await redis.hget(_user_key(user_id), "disabled_at"))


async def set_disabled(redis: Redis, user_id: str, disabled: bool) -> bool:
    """Disable or enable an account; False when it already was in that state.

    Only the flag changes: the caller ends the user's sessions after disabling.
    """
    if disabled:
        return bool(await redis.hsetnx(_user_key(user_id), "disabled_at", time.time()))
    return bool(await redis.hdel(_user_key(user_id), "disabled_at"))


async def get_account(redis: Redis, user_id: str) -> dict[str, str]:
    """Return an account's stored fields except the password hash; empty when it is gone."""
    raw = await redis.hgetall(_user_key(user_id))
    fields = {key.decode(): value.decode() for key, value in raw.items()}
    fields.pop("password_hash", None)
    return fields


async def list_user_ids(redis: Redis) -> list[str]:
    """Return the id of every account, by scanning the keyspace; for admin commands."""
    prefix = _user_key("")
    ids = [key.decode()[len(prefix) :] async for key in redis.scan_iter(f"{prefix}*", count=1000)]
    return sorted(ids)


async def delete_account(redis: Redis, user_id: str, username: str) -> None:
    """Delete an account and free its username; the caller removes its data first."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(_user_key(user_id))
        pipe.delete(_username_key(username))
        await pipe.execute()
    await limits.reset(redis, f"signin:account:{username.lower()}")
    # The rate limit of upload forms, which images.py counts per user id.
    await limits.reset(redis, f"upload-forms:{user_id}")


def current_user(request: Request[Any, Any, Any]) -> User | None:
    session = request.session
    if not session or "user_id" not in session:
        return None
    return User(id=session["user_id"], username=session["username"])


def require_user(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard: let only signed-in users through."""
    if not connection.session or "user_id" not in connection.session:
        raise NotAuthorizedException("Sign in to continue.")


def safe_next(path: str | None) -> str | None:
    """Return `path` when sign-in may redirect to it, otherwise None.

    Only a path on this site qualifies: one "/" first, because browsers open "//host" and
    "/\\host" on another site, and no scheme, backslash or control character.
    """
    if not path or len(path) > MAX_NEXT_LENGTH or not path.startswith("/"):
        return None
    if path.startswith("//") or "\\" in path or not path.isprintable():
        return None
    parts = urlsplit(path)
    if parts.scheme or parts.netloc:
        return None
    return path


def _signin_page(
    error: str | None,
    username: str,
    next_path: str | None,
    status_code: int = 200,
    *,
    session_ended: bool = False,
) -> Template:
    context = {
        "error": error,
        "username": username,
        "next_path": next_path,
        "session_ended": session_ended,
    }
    return Template("signin.html", context=context, status_code=status_code)


def _start_session(request: Request[Any, Any, Any], user: User) -> None:
    # A new session id at sign-in, so an id planted before it cannot ride the new session.
    request.scope.setdefault("state", {})["rotate_session"] = True
    request.set_session({"user_id": user.id, "username": user.username})


Form = Annotated[dict[str, str], Body(media_type=RequestEncodingType.URL_ENCODED)]


def _signup_closed() -> Template:
    logger.info("sign-up rejected: GALLERY_OPEN_SIGNUP is false")
    return Template("signup_closed.html", status_code=HTTP_403_FORBIDDEN)


@get("/signup", name="accounts:signup-page")
async def show_signup(settings: NamedDependency[Settings]) -> Template:
    if not settings.open_signup:
        return _signup_closed()
    return Template("signup.html", context={"error": None, "username": ""})


@post("/signup", name="accounts:signup")
async def sign_up(
    request: Request[Any, Any, Any],
    data: Form,
    redis: NamedDependency[Redis],
    settings: NamedDependency[Settings],
) -> Template | Redirect:
    if not settings.open_signup:
        return _signup_closed()
    username = data.get("username", "").strip()
    try:
        user = await create_user(redis, username, data.get("password", ""))
    except AccountError as error:
        context = {"error": str(error), "username": username}
        return Template("signup.html", context=context, status_code=400)
    _start_session(request, user)
    return Redirect(request.app.route_reverse("images:gallery"), status_code=HTTP_303_SEE_OTHER)


@get("/signin", name="accounts:signin-page")
async def show_signin(
    next_path: Annotated[str | None, QueryParameter(name="next")] = None,
    ended: FromQuery[str | None] = None,
) -> Template:
    """Show the sign-in form, which returns to `next_path` after sign-in when it is safe.

    `ended` is "1" in the redirect from a page that a request with an ended session opened.
    """
    return _signin_page(None, "", safe_next(next_path), session_ended=ended == "1")


@post("/signin", name="accounts:signin")
async def sign_in(
    request: Request[Any, Any, Any],
    data: Form,
    redis: NamedDependency[Redis],
    settings: NamedDependency[Settings],
) -> Template | Redirect:
    username = data.get("username", "").strip()[:MAX_USERNAME_INPUT]
    next_path = safe_next(data.get("next"))
    address = request.client.host if request.client else "unknown"
    # Both counters are checked before the password, so a throttled guess costs no hash.
    account_limit = f"signin:account:{username.lower()}"
    address_limit = f"signin:address:{address}"
    wait = max(
        await limits.seconds_until_allowed(
            redis, account_limit, settings.signin_failures_per_account
        ),
        await limits.seconds_until_allowed(
            redis, address_limit, settings.signin_failures_per_address
        ),
    )
    if wait:
        logger.warning("sign-in throttled for username %r from %s", username, address)
        minutes = -(-wait // 60)
        error = (
            f"Too many failed sign-ins. Try again in {minutes} minute{'s' if minutes > 1 else ''}."
        )
        return _signin_page(error, username, next_path, HTTP_429_TOO_MANY_REQUESTS)

    try:
        user = await authenticate(redis, username, data.get("password", ""))
    except AccountDisabled as disabled:
        logger.warning("sign-in rejected for disabled username %r from %s", username, address)
        return _signin_page(str(disabled), username, next_path, HTTP_403_FORBIDDEN)
    if user is None:
        logger.warning("failed sign-in for username %r from %s", username, address)
        await limits.record(redis, account_limit, SIGNIN_WINDOW_SECONDS)
        await limits.record(redis, address_limit, SIGNIN_WINDOW_SECONDS)
        return _signin_page("Wrong username or password.", username, next_path, 400)
    await limits.reset(redis, account_limit)
    _start_session(request, user)
    target = next_path or request.app.route_reverse("images:gallery")
    return Redirect(target, status_code=HTTP_303_SEE_OTHER)


@post("/signout", name="accounts:signout")
async def sign_out(request: Request[Any, Any, Any]) -> Redirect:
    request.clear_session()
    return Redirect(
        request.app.route_reverse("accounts:signin-page"), status_code=HTTP_303_SEE_OTHER
    )


router = Router(path="/", route_handlers=[show_signup, sign_up, show_signin, sign_in, sign_out])
