"""The deployment files: docker-compose.yml names only real settings and services."""

import re
from pathlib import Path

import yaml
from click.testing import CliRunner

from gallery.cli import main
from gallery.settings import ENV_NAMES

REPO_ROOT = Path(__file__).resolve().parents[1]


def _compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


def test_compose_passes_only_known_settings():
    known = set(ENV_NAMES.values())

    for name, service in _compose()["services"].items():
        for variable in service.get("environment", {}):
            assert variable in known, f"{name} sets unknown variable {variable}"


def test_compose_reads_only_known_settings_from_env_file():
    known = set(ENV_NAMES.values())
    text = (REPO_ROOT / "docker-compose.yml").read_text()

    # ${NAME:-default} is filled in from .env, and $$NAME is read by a service's shell.
    names = set(re.findall(r"\$\{([A-Z0-9_]+)", text)) | set(re.findall(r"\$\$([A-Z0-9_]+)", text))

    assert names
    assert names <= known, names - known


def test_compose_keeps_data_in_volumes():
    compose = _compose()

    assert "--appendonly" in compose["services"]["redis"]["command"]
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
