"""`gallery init-bucket` and `gallery doctor` against SeaweedFS (weed mini 4.48) and moto 5.2.5.

moto's server is an S3 that checks no POST policy and no signature, so `gallery doctor`
has to fail there.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import boto3
import httpx
import pytest
from botocore.config import Config
from click.testing import CliRunner, Result
from moto.server import ThreadedMotoServer

from gallery import doctor, storage
from gallery.cli import main
from gallery.embedded import free_port
from gallery.settings import Settings
from gallery.storage import Storage

CHECK_NAMES = [name for name, _ in doctor.CHECKS]

# The advisory checks that warn on SeaweedFS 4.48 after `gallery init-bucket`, and why.
SEAWEEDFS_WARNINGS = {
    "post-extra-cache-control-rejected": (
        "SeaweedFS 4.48 stores the object with 201 when Cache-Control is sent outside the policy"
    ),
    "credentials-least-privilege": (
        "the test's main key pair is a SeaweedFS admin, so it may read the bucket's ACL"
    ),
}

# The checks that fail on moto 5.2.5, which rejects only the unsigned GET among these
# requests.
MOTO_FAILURES = {
    "anonymous-put-rejected",
    "anonymous-list-rejected",
    "post-over-max-size-rejected",
    "post-changed-key-rejected",
    "post-changed-content-type-rejected",
    "post-extra-metadata-rejected",
    "post-expired-rejected",
    "tampered-get-rejected",
}

LINE_PATTERN = re.compile(r"(PASS [a-z-]+|(FAIL|WARN) [a-z-]+: .+)")


def with_new_bucket(settings: Settings) -> Settings:
    return replace(settings, s3_bucket=f"doctor-{secrets.token_hex(4)}")


def invoke(command: str, settings: Settings) -> Result:
    """Run a `gallery` command with the settings as its environment."""
    return CliRunner().invoke(main, [command], env=settings.to_env())


def s3_client(settings: Settings) -> Any:
    """Create a boto3 client for reading back what the commands set."""
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=settings.aws_access_key_id,
        aws_secret_access_key=settings.aws_secret_access_key,
        config=Config(s3={"addressing_style": "path"}),
    )


def read_bucket_rules(settings: Settings) -> tuple[list[dict], list[dict]]:
    """Return the bucket's CORS rules and lifecycle rules as S3 returns them."""
    client = s3_client(settings)
    cors = client.get_bucket_cors(Bucket=settings.s3_bucket)["CORSRules"]
    lifecycle = client.get_bucket_lifecycle_configuration(Bucket=settings.s3_bucket)["Rules"]
    return cors, lifecycle


def names_with(status: str, output: str) -> set[str]:
    """Return the names of the checks whose line starts with `status` (PASS, FAIL or WARN)."""
    return {line.split()[1].rstrip(":") for line in output.splitlines() if line.startswith(status)}


@pytest.fixture(scope="module")
def moto_settings(settings: Settings) -> Iterator[Settings]:
    """Hand over settings for a new bucket on a moto server bound to 127.0.0.1."""
    # The server runs in this process, so its request lines would mix into the output of
    # the commands under test, which logs to the same stderr.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port())
    server.start()
    host, port = server.get_host_and_port()
    yield with_new_bucket(replace(settings, s3_endpoint_url=f"http://{host}:{port}"))
    server.stop()


@pytest.fixture(scope="module")
def seaweedfs_doctor(settings: Settings) -> tuple[Settings, Result]:
    """Hand over settings for a new SeaweedFS bucket after init-bucket, and doctor's result."""
    bucket_settings = with_new_bucket(settings)
    assert invoke("init-bucket", bucket_settings).exit_code == 0
    return bucket_settings, invoke("doctor", bucket_settings)


@pytest.fixture(scope="module")
def moto_bucket(moto_settings: Settings) -> Settings:
    """Hand over the moto settings after `gallery init-bucket` made their bucket."""
    result = invoke("init-bucket", moto_settings)
    assert result.exit_code == 0, result.output
    return moto_settings


@pytest.fixture(scope="module")
def moto_doctor(moto_bucket: Settings) -> Result:
    return invoke("doctor", moto_bucket)


@pytest.fixture
async def probe(settings: Settings) -> AsyncIterator[doctor.Probe]:
    """Hand over a doctor probe on a new SeaweedFS bucket after `ensure_bucket`."""
    bucket_settings = with_new_bucket(settings)
    async with Storage.open(bucket_settings) as store, httpx.AsyncClient(timeout=15) as http:
        await store.ensure_bucket([bucket_settings.app_url])
        probe = doctor.Probe(store, bucket_settings, http)
        yield probe
        await store.delete(probe.written_keys)


def test_init_bucket_sets_cors_and_lifecycle(settings: Settings):
    bucket_settings = with_new_bucket(settings)

    result = invoke("init-bucket", bucket_settings)

    assert result.exit_code == 0, result.output
    assert bucket_settings.s3_bucket in result.output
    cors, lifecycle = read_bucket_rules(bucket_settings)
    assert len(cors) == 1
    assert cors[0]["AllowedOrigins"] == [bucket_settings.app_url]
    assert sorted(cors[0]["AllowedMethods"]) == ["GET", "POST"]
    assert lifecycle == storage.lifecycle_rules()


def test_init_bucket_twice_keeps_the_same_rules(settings: Settings):
    bucket_settings = with_new_bucket(settings)

    first = invoke("init-bucket", bucket_settings)
    rules_after_first = read_bucket_rules(bucket_settings)
    second = invoke("init-bucket", bucket_settings)
    rules_after_second = read_bucket_rules(bucket_settings)

    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    assert rules_after_second == rules_after_first


OPERATOR_CORS_RULE = {
    "ID": "operator-cdn",
    "AllowedOrigins": ["https://cdn.example.org"],
    "AllowedMethods": ["GET"],
    "AllowedHeaders": ["Range"],
    "ExposeHeaders": ["ETag"],
    "MaxAgeSeconds": 600,
}
OPERATOR_LIFECYCLE_RULE = {
    "ID": "operator-expire-exports",
    "Filter": {"Prefix": "exports/"},
    "Status": "Enabled",
    "Expiration": {"Days": 90},
}


def add_operator_rules(settings: Settings) -> None:
    """Add a CORS rule and a lifecycle rule of the operator's own to the bucket's rules."""
    client = s3_client(settings)
    cors, lifecycle = read_bucket_rules(settings)
    client.put_bucket_cors(
        Bucket=settings.s3_bucket, CORSConfiguration={"CORSRules": [*cors, OPERATOR_CORS_RULE]}
    )
    client.put_bucket_lifecycle_configuration(
        Bucket=settings.s3_bucket,
        LifecycleConfiguration={"Rules": [OPERATOR_LIFECYCLE_RULE, *lifecycle]},
    )


@pytest.mark.parametrize("service", ["seaweedfs", "moto"])
def test_init_bucket_twice_keeps_operator_rules(service: str, request: pytest.FixtureRequest):
    base = request.getfixturevalue("settings" if service == "seaweedfs" else "moto_settings")
    bucket_settings = with_new_bucket(base)
    moved = replace(bucket_settings, public_url="https://photos.example.org")
    assert invoke("init-bucket", bucket_settings).exit_code == 0
    add_operator_rules(bucket_settings)

    second = invoke("init-bucket", moved)
    third = invoke("init-bucket", moved)
    cors, lifecycle = read_bucket_rules(moved)

    assert second.exit_code == 0, second.output
    assert third.exit_code == 0, third.output
    cors_by_id = {rule.get("ID"): rule for rule in cors}
    assert sorted(cors_by_id) == sorted([storage.CORS_RULE_ID, "operator-cdn"])
    assert len(cors) == 2
    assert cors_by_id[storage.CORS_RULE_ID]["AllowedOrigins"] == ["https://photos.example.org"]
    assert cors_by_id["operator-cdn"]["AllowedOrigins"] == ["https://cdn.example.org"]
    assert cors_by_id["operator-cdn"]["AllowedMethods"] == ["GET"]
    assert cors_by_id["operator-cdn"]["ExposeHeaders"] == ["ETag"]
    assert lifecycle[0] == OPERATOR_LIFECYCLE_RULE
    assert lifecycle[1:] == storage.lifecycle_rules()


def test_init_bucket_replaces_cors_rule_without_id(settings: Settings):
    bucket_settings = with_new_bucket(settings)
    s3_client(settings).create_bucket(Bucket=bucket_settings.s3_bucket)
    # The rule that init-bucket wrote before its rule had an ID, for an old address.
    old_rule = dict(storage.cors_rule(["http://old:8000"]))
    del old_rule["ID"]
    s3_client(settings).put_bucket_cors(
        Bucket=bucket_settings.s3_bucket,
        CORSConfiguration={"CORSRules": [old_rule, OPERATOR_CORS_RULE]},
    )

    result = invoke("init-bucket", bucket_settings)
    cors, _ = read_bucket_rules(bucket_settings)

    assert result.exit_code == 0, result.output
    assert [rule.get("ID") for rule in cors] == [storage.CORS_RULE_ID, "operator-cdn"]
    assert cors[0]["AllowedOrigins"] == [bucket_settings.app_url]


@pytest.mark.parametrize(
    ("current", "expected"),
    [
        ([], ["ours"]),
        ([{"ID": "theirs"}], ["theirs", "ours"]),
        ([{"ID": "theirs"}, {"ID": "ours"}, {"ID": "last"}], ["theirs", "ours", "last"]),
        ([{"ID": "ours"}, {"ID": "theirs"}, {"ID": "ours"}], ["ours", "theirs"]),
    ],
)
def test_merge_rules_replaces_ours_in_place(current, expected):
    merged = storage.merge_rules(current, [{"ID": "ours"}], is_ours=lambda r: r["ID"] == "ours")

    assert [rule["ID"] for rule in merged] == expected


def test_init_bucket_notes_missing_public_access_block(settings: Settings, caplog):
    caplog.set_level(logging.INFO, logger="gallery.storage")
    bucket_settings = with_new_bucket(settings)

    result = invoke("init-bucket", bucket_settings)

    assert result.exit_code == 0, result.output
    assert "does not implement PutPublicAccessBlock" in caplog.text


def test_init_bucket_blocks_public_access_on_moto(moto_bucket: Settings):
    client = s3_client(moto_bucket)

    block = client.get_public_access_block(Bucket=moto_bucket.s3_bucket)

    assert block["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "IgnorePublicAcls": True,
        "BlockPublicPolicy": True,
        "RestrictPublicBuckets": True,
    }


def test_init_bucket_sets_same_rules_on_moto(moto_bucket: Settings):
    cors, lifecycle = read_bucket_rules(moto_bucket)

    assert cors[0]["AllowedOrigins"] == [moto_bucket.app_url]
    assert lifecycle == storage.lifecycle_rules()


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            name,
            marks=pytest.mark.xfail(
                strict=True, raises=AssertionError, reason=SEAWEEDFS_WARNINGS[name]
            )
            if name in SEAWEEDFS_WARNINGS
            else (),
        )
        for name in CHECK_NAMES
    ],
)
def test_doctor_check_passes_on_seaweedfs(seaweedfs_doctor: tuple[Settings, Result], name: str):
    _, result = seaweedfs_doctor

    assert f"PASS {name}" in result.output.splitlines(), result.output


def test_doctor_prints_one_line_per_check(seaweedfs_doctor: tuple[Settings, Result]):
    _, result = seaweedfs_doctor
    lines = result.output.splitlines()

    assert [line.split()[1].rstrip(":") for line in lines] == CHECK_NAMES
    for line in lines:
        assert LINE_PATTERN.fullmatch(line), line


def test_doctor_passes_on_seaweedfs_with_known_warnings(
    seaweedfs_doctor: tuple[Settings, Result],
):
    _, result = seaweedfs_doctor

    assert names_with("FAIL", result.output) == set(), result.output
    assert names_with("WARN", result.output) == set(SEAWEEDFS_WARNINGS), result.output
    assert result.exit_code == 0, result.output


async def test_doctor_deletes_its_objects(seaweedfs_doctor: tuple[Settings, Result]):
    bucket_settings, _ = seaweedfs_doctor

    async with Storage.open(bucket_settings) as store:
        left = [key async for key in store.list_keys(doctor.CHECK_PREFIX)]

    assert left == []


def test_doctor_fails_on_moto(moto_doctor: Result):
    assert moto_doctor.exit_code == 1
    assert names_with("FAIL", moto_doctor.output) == MOTO_FAILURES, moto_doctor.output
    for line in moto_doctor.output.splitlines():
        assert LINE_PATTERN.fullmatch(line), line


async def test_lifecycle_check_fails_without_lifecycle_rules(probe):
    s3_client(probe.settings).delete_bucket_lifecycle(Bucket=probe.store.bucket)

    expires = await doctor._run("expires", doctor.check_lifecycle_expires_incoming, probe)
    aborts = await doctor._run("aborts", doctor.check_lifecycle_aborts_multipart, probe)

    assert "no enabled lifecycle rule" in expires.problem
    assert "no enabled lifecycle rule" in aborts.problem


async def test_cors_check_fails_for_other_origin(probe):
    probe.settings = replace(probe.settings, public_url="https://photos.example")

    result = await doctor._run("cors", doctor.check_cors, probe)

    assert result.problem is not None
    assert "https://photos.example" in result.problem


async def test_unexpected_error_fails_only_its_check(probe):
    async def broken_check(probe: doctor.Probe) -> None:
        raise KeyError("Rules")

    result = await doctor._run("broken", broken_check, probe)

    assert result.problem == "unexpected KeyError: 'Rules'"


@pytest.mark.parametrize(
    ("rule_filter", "tags", "selects"),
    [
        ({"Prefix": "incoming/"}, {}, True),
        ({"Prefix": "u/"}, {}, False),
        ({"Tag": {"Key": "state", "Value": "incoming"}}, {"state": "incoming"}, True),
        ({"Tag": {"Key": "state", "Value": "incoming"}}, {}, False),
        (
            {"And": {"Prefix": "incoming/", "Tags": [{"Key": "state", "Value": "incoming"}]}},
            {"state": "incoming"},
            True,
        ),
        ({"And": {"Prefix": "incoming/", "ObjectSizeGreaterThan": 1024}}, {}, False),
        ({"And": {"Prefix": "incoming/", "ObjectSizeLessThan": 1024}}, {}, False),
    ],
    ids=["prefix", "other_prefix", "tag", "tag_missing", "and", "size_above", "size_below"],
)
def test_rule_selects_upload_keys(settings: Settings, rule_filter, tags, selects):
    rule = {"ID": "rule", "Filter": rule_filter, "Status": "Enabled", "Expiration": {"Days": 1}}

    assert doctor._rule_selects(rule, "incoming/user/upload", tags, settings) is selects


async def test_least_privilege_warns_for_admin_credentials(seaweedfs_doctor):
    _, result = seaweedfs_doctor

    line = next(x for x in result.output.splitlines() if "credentials-least-privilege" in x)

    assert line.startswith("WARN credentials-least-privilege: ")
    assert "s3:GetBucketAcl" in line


async def test_least_privilege_passes_for_object_only_credentials(seaweedfs_doctor, s3_server):
    bucket_settings, _ = seaweedfs_doctor
    access_key, secret_key = s3_server.object_only_keys
    limited = replace(
        bucket_settings, aws_access_key_id=access_key, aws_secret_access_key=secret_key
    )

    async with Storage.open(limited) as store:
        may_read_acl = await store.may_read_bucket_acl()
        listed = [key async for key in store.list_keys("")]

    assert may_read_acl is False
    assert listed == []
