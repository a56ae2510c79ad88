"""Account administration for `gallery users`: list, disable, enable and delete accounts."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from redis.asyncio import Redis

from gallery import accounts, index, quotas, sessions, shares, storage
from gallery.quotas import Quota, Usage
from gallery.settings import Settings
from gallery.storage import Storage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UserSummary:
    """One account as `gallery users list` shows it."""

    id: str
    username: str
    # Unix times; disabled_at is 0 while the account is enabled.
    created_at: float
    disabled_at: float
    quota: Quota
    usage: Usage


@dataclass(frozen=True)
class DeletedUser:
    """Counts of what deleting an account removed."""

    uploads: int
    objects: int
    shares: int
    sessions: int


class UnknownUser(LookupError):
    """No account has this username."""

    def __init__(self, username: str) -> None:
        super().__init__(f"no user named {username!r}")


async def find_user_id(redis: Redis, username: str) -> str:
    """Return the id of the account with this username, or raise UnknownUser."""
    user_id = await accounts.find_user_id(redis, username)
    if user_id is None:
        raise UnknownUser(username)
    return user_id


async def list_users(redis: Redis, settings: Settings) -> list[UserSummary]:
    """Return every account with its quota and usage, sorted by username."""
    summaries = []
    for user_id in await accounts.list_user_ids(redis):
        account = await accounts.get_account(redis, user_id)
        # An account deleted since the scan found its key.
        if "username" not in account:
            continue
        quota, usage = await quotas.get_quota_and_usage(redis, user_id, settings)
        summary = UserSummary(
            id=user_id,
            username=account["username"],
            created_at=float(account.get("created_at", 0)),
            disabled_at=float(account.get("disabled_at", 0)),
            quota=quota,
            usage=usage,
        )
        summaries.append(summary)
    return sorted(summaries, key=lambda summary: summary.username.lower())


async def disable_user(redis: Redis, user_id: str) -> tuple[bool, int]:
    """Stop an account signing in and its share links opening, and end its sessions.

    Returns whether it was enabled before, and how many sessions ended. Its images,
    shares and quota stay. Share links return 404 while it is disabled, but image URLs
    that a shared page handed out before keep working until they expire, at most
    GALLERY_SHARE_URL_EXPIRY_SECONDS later.
    """
    # The flag is set before the scan, so sign-ins that start later fail.
    changed = await accounts.set_disabled(redis, user_id, True)
    # NOTE: a sign-in that read the flag just before it was set can store its session after
    # the scan passed that key. Running the command again ends such a session too.
    ended = await sessions.end_user_sessions(redis, user_id)
    logger.info("disabled user %s and ended %d sessions", user_id, ended)
    return changed, ended


async def enable_user(redis: Redis, user_id: str) -> bool:
    """Let a disabled account sign in again; return whether it was disabled."""
    changed = await accounts.set_disabled(redis, user_id, False)
    logger.info("enabled user %s", user_id)
    return changed


async def delete_user(redis: Redis, store: Storage, user_id: str, username: str) -> DeletedUser:
    """Delete an account and everything of it: objects, records, shares, quota, sessions.

    Every step can run again, and the account itself goes last, so running this again
    after an interruption finds the account by its username and finishes the job. The
    account is disabled first, so it cannot sign in or open share links meanwhile.
    """
    _, ended = await disable_user(redis, user_id)
    share_count = await shares.delete_user_shares(redis, user_id)
    # Records go before objects: a worker that finishes an upload of this user afterwards
    # finds its record gone and deletes what it stored. The objects are found by listing
    # the user's prefixes, so an interruption here leaves nothing that a rerun misses.
    upload_count = await index.delete_user_uploads(redis, user_id)
    object_count = 0
    for prefix in (storage.user_folder(user_id), storage.incoming_key(user_id, "")):
        keys = [key async for key in store.list_keys(prefix)]
        object_count += await store.delete(keys)
    # NOTE: a verify job that was running for this user adds and then releases its image
    # in the usage counters after this, which leaves a usage hash of zeros behind.
    await quotas.delete_user_counters(redis, user_id)
    await accounts.delete_account(redis, user_id, username)
    logger.info(
        "deleted user %s: %d uploads, %d objects, %d shares, %d sessions",
        user_id,
        upload_count,
        object_count,
        share_count,
        ended,
    )
    return DeletedUser(
        uploads=upload_count, objects=object_count, shares=share_count, sessions=ended
    )
