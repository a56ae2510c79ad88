"""`gallery users`: listing, disabling, enabling and deleting accounts on SeaweedFS and Valkey."""

from __future__ import annotations

import asyncio
import html
import re

import httpx
from click.testing import CliRunner

from gallery import accounts, index, quotas, shares, storage, user_admin
from gallery.cli import main
from tests.support import TEST_PASSWORD, make_jpeg, seed_grid

LINK = re.compile(r'id="share-link" value="([^"]+)"')


async def _run(settings, *args: str, stdin: str | None = None):
    """Run `gallery ARGS` in a thread, because the command runs its own event loop."""

    def invoke():
        return CliRunner().invoke(main, list(args), env=settings.to_env(), input=stdin)

    return await asyncio.to_thread(invoke)


async def _sign_in(http, username: str, password: str = TEST_PASSWORD) -> httpx.Response:
    await http.get("/signin")
    return await http.post(
        "/signin",
        data={"username": username, "password": password},
        headers={"x-csrftoken": http.cookies["csrftoken"]},
        follow_redirects=False,
    )


async def _share_path(client, image_ids: list[str]) -> str:
    form = {
        "title": "Trip",
        "expires_in": str(shares.DEFAULT_EXPIRY_SECONDS),
        "image_id": image_ids,
    }
    response = await client.http.post("/shares", data=form, headers=client.csrf)
    assert response.status_code == 201, response.text
    return httpx.URL(html.unescape(LINK.search(response.text).group(1))).path


async def _user_id(redis, username: str) -> str:
    user_id = await accounts.find_user_id(redis, username)
    assert user_id is not None
    return user_id


async def _keys_naming(redis, text: str) -> list[str]:
    return sorted([key.decode() async for key in redis.scan_iter(f"*{text}*", count=1000)])


async def _bucket_keys(store, user_id: str) -> list[str]:
    keys = []
    for prefix in (storage.user_folder(user_id), storage.incoming_key(user_id, "")):
        keys += [key async for key in store.list_keys(prefix)]
    return keys


async def test_list_shows_usage_quota_and_status(make_client, settings, redis):
    active = await make_client()
    blocked = await make_client()
    active_id = await _user_id(redis, active.username)
    await quotas.commit(redis, active_id, "counted-image", 3 * 1024 * 1024)
    await _run(settings, "set-quota", active.username, "--max-bytes", "1GiB", "--max-images", "9")
    await _run(settings, "users", "disable", blocked.username)

    result = await _run(settings, "users", "list")

    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    assert lines["NAME"].split() == [
        "NAME",
        "CREATED",
        "(UTC)",
        "IMAGES",
        "USED",
        "QUOTA",
        "STATUS",
    ]
    assert re.search(
        r"\s\d{4}-\d\d-\d\d \d\d:\d\d\s+1\s+3\.0 MiB\s+1\.0 GiB, 9 images\s+enabled$",
        lines[active.username],
    ), lines[active.username]
    default_quota = f"{quotas.format_bytes(settings.quota_bytes)}, {settings.quota_images} images"
    assert re.search(rf"\s0\s+0 bytes\s+{re.escape(default_quota)}\s", lines[blocked.username])
    assert re.search(r"disabled \d{4}-\d\d-\d\d \d\d:\d\d$", lines[blocked.username])


async def test_disable_ends_sessions_and_rejects_sign_in(make_client, settings, redis):
    client = await make_client()
    other = await make_client()

    result = await _run(settings, "users", "disable", client.username)
    gallery = await client.http.get("/images", follow_redirects=False)
    other_gallery = await other.http.get("/images", follow_redirects=False)
    right_password = await _sign_in(client.http, client.username)
    wrong_password = await _sign_in(client.http, client.username, "not the password")

    assert result.exit_code == 0, result.output
    assert f"{client.username} disabled; ended 1 sessions" in result.output
    assert gallery.status_code in (302, 303)
    # The session cookie still arrives, so the sign-in page shows that the session ended.
    assert gallery.headers["location"] == "/signin?ended=1"
    assert other_gallery.status_code == 200
    assert right_password.status_code == 403
    assert "This account is disabled." in right_password.text
    assert wrong_password.status_code == 400
    assert "Wrong username or password." in wrong_password.text
    assert "disabled" not in wrong_password.text


async def test_enable_lets_disabled_user_sign_in(make_client, settings):
    client = await make_client()
    await _run(settings, "users", "disable", client.username)

    again = await _run(settings, "users", "disable", client.username)
    result = await _run(settings, "users", "enable", client.username)
    signed_in = await _sign_in(client.http, client.username)
    gallery = await client.http.get("/images", follow_redirects=False)

    assert f"{client.username} was already disabled" in again.output
    assert result.exit_code == 0, result.output
    assert f"{client.username} enabled" in result.output
    assert signed_in.status_code in (302, 303), signed_in.text
    assert gallery.status_code == 200


async def test_disabled_users_share_link_is_404_until_enabled(make_client, settings, redis):
    client = await make_client()
    user_id = await _user_id(redis, client.username)
    [image_id] = await seed_grid(redis, user_id, 1, ready=True)
    path = await _share_path(client, [image_id])
    visitor = await make_client()

    before = await visitor.http.get(path)
    await _run(settings, "users", "disable", client.username)
    while_disabled = await visitor.http.get(path)
    image_while_disabled = await visitor.http.get(f"{path}/{image_id}")
    await _run(settings, "users", "enable", client.username)
    after = await visitor.http.get(path)

    assert before.status_code == 200
    assert while_disabled.status_code == 404
    assert "This link does not exist, has expired or was revoked." in while_disabled.text
    assert image_while_disabled.status_code == 404
    assert after.status_code == 200


async def test_unknown_user_fails_with_message(settings):
    for command in (["disable"], ["enable"], ["delete", "--yes"]):
        result = await _run(settings, "users", *command, "nobody-at-all")

        assert result.exit_code == 1, command
        assert "no user named 'nobody-at-all'" in result.output


async def test_delete_asks_first_and_keeps_account_on_no(make_client, settings, redis):
    client = await make_client()

    result = await _run(settings, "users", "delete", client.username, stdin="n\n")

    assert result.exit_code == 1
    assert f"Delete user {client.username} with 0 images (0 bytes) for good?" in result.output
    assert await accounts.find_user_id(redis, client.username) is not None


async def test_delete_removes_every_trace_of_user(
    make_client, settings, redis, store, run_worker, forget_uploads
):
    client = await make_client()
    neighbour = await make_client()
    user_id = await _user_id(redis, client.username)
    kept_id = await neighbour.upload(make_jpeg(color=(10, 200, 10)))
    image_ids = [await client.upload(make_jpeg(color=(30 * i, 60, 90))) for i in range(3)]
    rejected_id = await client.upload(make_jpeg(), "not-a.png", "image/png")
    await run_worker()
    path = await _share_path(client, image_ids[:2])
    await client.http.post(f"/images/{image_ids[2]}/trash", headers=client.csrf)
    # An upload whose form was signed but whose file never came: only the sweep's set has it.
    unfinished = (await client.request_form("late.jpg", "image/jpeg", 100)).json()["id"]
    forget_uploads.append(unfinished)
    await redis.zrem(f"gallery:user-pending:{user_id}", unfinished)
    await store.write(
        storage.incoming_key(user_id, "stray"), b"x", content_type="image/jpeg", metadata={}
    )
    assert len(await _bucket_keys(store, user_id)) == 3 * 4 + 1

    result = await _run(settings, "users", "delete", client.username, stdin="y\n")
    shared = await neighbour.http.get(path)
    signed_in = await _sign_in(client.http, client.username)

    assert result.exit_code == 0, result.output
    assert "with 3 images" in result.output
    assert (
        f"deleted user {client.username}: 5 uploads, 13 objects, 1 share links and 1 sessions"
        in result.output
    )
    assert await _bucket_keys(store, user_id) == []
    assert await _keys_naming(redis, user_id) == []
    for upload_id in [*image_ids, rejected_id, unfinished]:
        assert await index.get_upload(redis, upload_id) is None
        assert await redis.zscore(index.PENDING_KEY, upload_id) is None
        assert await redis.zscore(index.TRASHED_KEY, upload_id) is None
        assert await _keys_naming(redis, upload_id) == []
    assert await accounts.find_user_id(redis, client.username) is None
    assert shared.status_code == 404
    assert signed_in.status_code == 400
    assert (await index.get_upload(redis, kept_id)).state == index.State.READY
    assert len(await _bucket_keys(store, (await index.get_upload(redis, kept_id)).user_id)) == 4


async def test_delete_finishes_when_run_again_after_failure(
    make_client, settings, redis, store, run_worker, monkeypatch
):
    client = await make_client()
    user_id = await _user_id(redis, client.username)
    await client.upload(make_jpeg())
    await run_worker()

    async def fail(*_args, **_kwargs):
        raise ConnectionError("Redis went away")

    monkeypatch.setattr(user_admin.accounts, "delete_account", fail)
    interrupted = await _run(settings, "users", "delete", client.username, "--yes")
    monkeypatch.undo()
    blocked = await _sign_in(client.http, client.username)
    finished = await _run(settings, "users", "delete", client.username, "--yes")
    again = await _run(settings, "users", "delete", client.username, "--yes")

    assert interrupted.exit_code != 0
    assert blocked.status_code == 403
    assert finished.exit_code == 0, finished.output
    assert "0 uploads, 0 objects" in finished.output
    assert await _bucket_keys(store, user_id) == []
    assert await _keys_naming(redis, user_id) == []
    assert again.exit_code == 1
    assert f"no user named {client.username!r}" in again.output
