"""Settings: read from the environment, validated at start, listed in .env.example."""

from pathlib import Path

import pytest

from gallery.settings import ENV_NAMES, Settings, SettingsError
from tests.support import COMPOSE_ONLY_VARIABLES

REPO_ROOT = Path(__file__).resolve().parents[1]


def _example_names() -> set[str]:
    lines = (REPO_ROOT / ".env.example").read_text().splitlines()
    return {line.split("=", 1)[0] for line in lines if line and not line.startswith("#")}


def test_env_example_lists_every_setting():
    assert _example_names() == set(ENV_NAMES.values()) | set(COMPOSE_ONLY_VARIABLES)


def test_env_example_defaults_parse():
    lines = (REPO_ROOT / ".env.example").read_text().splitlines()
    values = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))

    settings = Settings.from_env(values)

    assert settings.port == 8000
    assert settings.max_upload_bytes == 25 * 1024 * 1024


def test_empty_environment_gives_defaults():
    settings = Settings.from_env({})

    assert settings == Settings()
    assert settings.uses_embedded_services


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("GALLERY_PORT", "eighty", "GALLERY_PORT='eighty' is invalid: expected an integer"),
        ("GALLERY_PORT", "70000", "GALLERY_PORT=70000 is invalid: expected a port from 1"),
        ("GALLERY_RENDITION_QUALITY", "101", "GALLERY_RENDITION_QUALITY=101 is invalid"),
        ("GALLERY_RENDITION_QUALITY", "-5", "GALLERY_RENDITION_QUALITY=-5 is invalid"),
        ("GALLERY_SECURE_COOKIES", "maybe", "GALLERY_SECURE_COOKIES='maybe' is invalid"),
        ("GALLERY_URL_EXPIRY_SECONDS", "0", "GALLERY_URL_EXPIRY_SECONDS=0 is invalid"),
        ("GALLERY_UPLOAD_FORM_SECONDS", "301", "GALLERY_UPLOAD_FORM_SECONDS=301 is out"),
        ("GALLERY_MAX_UPLOAD_BYTES", "0", "GALLERY_MAX_UPLOAD_BYTES must be a positive"),
        ("GALLERY_WORKER_PROCESSES", "-1", "GALLERY_WORKER_PROCESSES=-1 is invalid"),
        ("GALLERY_SHARE_URL_EXPIRY_SECONDS", "0", "GALLERY_SHARE_URL_EXPIRY_SECONDS=0 is out"),
        ("GALLERY_MAX_ACTIVE_SHARES", "0", "GALLERY_MAX_ACTIVE_SHARES must be a positive"),
        ("GALLERY_QUOTA_BYTES", "-1", "GALLERY_QUOTA_BYTES=-1 is invalid: expected 0 or more"),
        ("GALLERY_QUOTA_IMAGES", "many", "GALLERY_QUOTA_IMAGES='many' is invalid"),
        ("GALLERY_LOG_FORMAT", "xml", "GALLERY_LOG_FORMAT='xml' is invalid: expected one of"),
        ("GALLERY_LOG_LEVEL", "LOUD", "GALLERY_LOG_LEVEL='LOUD' is invalid"),
        ("GALLERY_SECRET_KEY", "short", "GALLERY_SECRET_KEY is too short"),
        ("GALLERY_REDIS_URL", "localhost:6379", "GALLERY_REDIS_URL is not a valid URL"),
        ("REDIS_URL", "http://x", "REDIS_URL is not a valid URL: expected redis://"),
        ("GALLERY_S3_ENDPOINT_URL", "s3.local", "GALLERY_S3_ENDPOINT_URL is not a valid URL"),
        ("GALLERY_PUBLIC_URL", "gallery.example", "GALLERY_PUBLIC_URL is not a valid URL"),
    ],
)
def test_bad_value_names_the_variable(name, value, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        Settings.from_env({name: value})


def test_bad_redis_url_message_leaves_out_password():
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"GALLERY_REDIS_URL": "http://:hunter2secret@redis:6379"})

    assert "hunter2secret" not in str(raised.value)


@pytest.mark.parametrize(
    "name", ["GALLERY_REDIS_URL", "REDIS_URL", "GALLERY_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"]
)
def test_any_explicit_service_turns_embedded_services_off(name):
    value = "redis://x" if "REDIS" in name else "http://x"

    assert not Settings.from_env({name: value}).uses_embedded_services


def test_redis_url_standard_name_is_read():
    settings = Settings.from_env({"REDIS_URL": "redis://standard:6379/0"})

    assert settings.redis_url == "redis://standard:6379/0"


def test_gallery_redis_url_wins_over_standard_name():
    environ = {"REDIS_URL": "redis://standard:6379/0", "GALLERY_REDIS_URL": "redis://ours:1/0"}

    assert Settings.from_env(environ).redis_url == "redis://ours:1/0"


def test_aws_standard_names_set_endpoint_and_region():
    environ = {"AWS_ENDPOINT_URL_S3": "https://s3.example", "AWS_REGION": "eu-west-1"}

    settings = Settings.from_env(environ)

    assert settings.s3_endpoint_url == "https://s3.example"
    assert settings.s3_region == "eu-west-1"


def test_old_s3_name_still_works_with_warning(caplog):
    settings = Settings.from_env({"S3_BUCKET": "photos"})

    assert settings.s3_bucket == "photos"
    assert "S3_BUCKET is deprecated: rename it to GALLERY_S3_BUCKET" in caplog.text


def test_old_and_new_name_with_different_values_fail():
    environ = {"S3_BUCKET": "photos", "GALLERY_S3_BUCKET": "pictures"}

    with pytest.raises(SettingsError, match="GALLERY_S3_BUCKET and S3_BUCKET are both set"):
        Settings.from_env(environ)


def test_require_services_names_missing_variable():
    with pytest.raises(SettingsError, match=r"GALLERY_REDIS_URL is not set \(nor REDIS_URL\)"):
        Settings.from_env({"GALLERY_S3_ENDPOINT_URL": "http://127.0.0.1:1"}).require_services()


def test_short_secret_key_is_rejected():
    settings = Settings(
        redis_url="redis://127.0.0.1:1",
        s3_endpoint_url="http://127.0.0.1:1",
        aws_access_key_id="a",
        aws_secret_access_key="b",
        secret_key="short",
    )

    with pytest.raises(SettingsError, match="GALLERY_SECRET_KEY"):
        settings.require_services()


def test_to_env_round_trips():
    settings = Settings(
        port=8123, secure_cookies=True, s3_bucket="photos", quota_bytes=5, log_format="json"
    )

    assert Settings.from_env(settings.to_env()) == settings


def test_url_expiry_over_7_days_is_cut(caplog):
    settings = Settings.from_env({"GALLERY_URL_EXPIRY_SECONDS": "1000000"})

    assert settings.url_expiry_seconds == 7 * 24 * 3600
    assert "GALLERY_URL_EXPIRY_SECONDS=1000000 is over the SigV4 maximum" in caplog.text
