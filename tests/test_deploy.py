"""The deployment files: docker-compose.yml names only real settings and services."""

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from click.testing import CliRunner

from gallery.cli import main
from gallery.settings import ENV_NAMES, Settings
from tests.support import COMPOSE_ONLY_VARIABLES

REPO_ROOT = Path(__file__).resolve().parents[1]

# The services that run the gallery's image, with the whole .env.
GALLERY_SERVICES = ("init-bucket", "web", "worker")

# ${NAME}, ${NAME:-default} or ${NAME:?message}, which Compose fills in from .env.
INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?::([-?])([^}]*))?\}")


def _compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


class ComposeStops(Exception):
    """Compose would stop with this message: a ${NAME:?message} variable is unset or empty."""


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Fill in ${...} as Compose does from .env, for the forms the compose file uses."""

    def fill(match: re.Match[str]) -> str:
        name, operator, argument = match.groups()
        if env.get(name):
            return env[name]
        if operator == "?":
            raise ComposeStops(argument)
        return argument if operator == "-" else ""

    return INTERPOLATION.sub(fill, value)


def test_compose_passes_only_known_settings():
    known = set(ENV_NAMES.values())

    for name in GALLERY_SERVICES:
        for variable in _compose()["services"][name].get("environment", {}):
            assert variable in known, f"{name} sets unknown variable {variable}"


def test_compose_reads_only_known_settings_from_env_file():
    known = set(ENV_NAMES.values()) | set(COMPOSE_ONLY_VARIABLES)
    text = (REPO_ROOT / "docker-compose.yml").read_text()

    # ${NAME:-default} is filled in from .env, and $$NAME is read by a service's shell.
    names = set(re.findall(r"\$\{([A-Z0-9_]+)", text)) | set(re.findall(r"\$\$([A-Z0-9_]+)", text))

    assert names
    assert names <= known, names - known


def test_only_gallery_services_read_whole_env_file():
    for name, service in _compose()["services"].items():
        if name in GALLERY_SERVICES:
            assert service["env_file"] == ".env", name
        else:
            assert "env_file" not in service, f"{name} gets every secret in .env"


def test_s3_service_gets_only_its_key_pair():
    s3 = _compose()["services"]["s3"]
    read_by_shell = set(re.findall(r"\$\$([A-Z0-9_]+)", " ".join(s3["command"])))

    assert set(s3["environment"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert read_by_shell == set(s3["environment"])
    for variable, value in s3["environment"].items():
        assert value.startswith(f"${{{variable}:?"), f"{variable} has no required value"


def test_valkey_requires_password_from_env_file():
    redis = _compose()["services"]["redis"]
    script = " ".join(redis["command"])
    env = {"VALKEY_PASSWORD": "f00dcafe"}

    assert "printf 'requirepass %s\\n' \"$$VALKEY_PASSWORD\" > /run/valkey/valkey.conf" in script
    assert "valkey-server /run/valkey/valkey.conf" in script
    assert "--appendonly yes" in script
    assert "VALKEY_PASSWORD" not in " ".join(redis["entrypoint"])
    assert _interpolate(redis["environment"]["VALKEY_PASSWORD"], env) == "f00dcafe"
    # valkey-cli in the health check and in `docker compose exec` signs in with this.
    assert _interpolate(redis["environment"]["REDISCLI_AUTH"], env) == "f00dcafe"
    assert "PONG" in " ".join(redis["healthcheck"]["test"])


def test_gallery_redis_url_carries_valkey_password():
    services = _compose()["services"]
    env = {"VALKEY_PASSWORD": "f00dcafe"}

    for name in GALLERY_SERVICES:
        url = _interpolate(services[name]["environment"]["GALLERY_REDIS_URL"], env)
        settings = Settings.from_env({"GALLERY_REDIS_URL": url})

        assert urlsplit(settings.redis_url).password == "f00dcafe", name
        assert urlsplit(settings.redis_url).hostname == "redis", name


def test_compose_without_valkey_password_stops():
    services = _compose()["services"]
    values = [
        services["web"]["environment"]["GALLERY_REDIS_URL"],
        services["redis"]["environment"]["VALKEY_PASSWORD"],
        services["redis"]["environment"]["REDISCLI_AUTH"],
    ]

    for value in values:
        with pytest.raises(ComposeStops, match="set VALKEY_PASSWORD in .env"):
            _interpolate(value, {"VALKEY_PASSWORD": ""})


def test_compose_keeps_data_in_volumes():
    compose = _compose()

    assert "--appendonly yes" in " ".join(compose["services"]["redis"]["command"])
    assert "redis-data:/data" in compose["services"]["redis"]["volumes"]
    assert "s3-data:/data" in compose["services"]["s3"]["volumes"]
    assert set(compose["volumes"]) == {"redis-data", "s3-data"}


def test_compose_depends_on_defined_services():
    services = _compose()["services"]

    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on undefined {dependency}"


def test_compose_services_have_health_checks_or_run_once():
    for name, service in _compose()["services"].items():
        assert "healthcheck" in service or service.get("restart") == "no", name


def test_compose_commands_are_gallery_subcommands():
    subcommands = set(main.commands)

    for name, service in _compose()["services"].items():
        command = service.get("command")
        if command and command[0] == "gallery":
            assert command[1] in subcommands, f"{name} runs unknown `gallery {command[1]}`"


def test_compose_runs_two_workers():
    assert _compose()["services"]["worker"]["deploy"]["replicas"] == 2


def test_serve_without_services_names_missing_variable(monkeypatch):
    for variable in ENV_NAMES.values():
        monkeypatch.delenv(variable, raising=False)

    result = CliRunner().invoke(main, ["serve"])

    assert result.exit_code == 1
    assert "GALLERY_REDIS_URL is not set" in result.output
