"""Structure of the deployment files checked against the real CLI and settings.

No Docker engine runs in CI, so nothing is built or started here. The tests
parse docker-compose.yml, the Dockerfile, the systemd units and the settings
example, then check each command with vodq's own argument parser and each
variable with vodq.config.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from vodq.cli import _parser
from vodq.config import KNOWN_VARIABLES, load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy"
ENV_EXAMPLE = DEPLOY / "vodq.env.example"
UNITS = ("vodq.service", "vodq-worker.service")
VODQ_SERVICES = ("api", "worker")
VENV_VODQ = "/opt/vodq/venv/bin/vodq"

# ${NAME:-default} and ${NAME-default}, as Compose substitutes them.
SUBSTITUTION = re.compile(r"\$\{(?P<name>\w+):?-(?P<default>[^}]*)\}")
# VARIABLE=value lines of an env file, set or commented out.
ENV_LINE = re.compile(r"^(?P<comment>#)?\s*(?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")


# -- helpers --------------------------------------------------------------


def subcommands() -> set[str]:
    """Return the subcommands that vodq's argument parser accepts."""
    for action in _parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    raise AssertionError("vodq's parser has no subcommands")


def parses(argv: list[str]) -> bool:
    """Return whether vodq's parser accepts ``argv`` (without the program name)."""
    try:
        _parser().parse_args(argv)
    except SystemExit:
        return False
    return True


def as_argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


def substitute_defaults(text: str) -> str:
    """Replace every ${NAME:-default} with its default, as with NAME unset."""
    return SUBSTITUTION.sub(lambda match: match.group("default"), text)


def environment(service: dict[str, Any]) -> dict[str, str]:
    """Return a service's ``environment`` as a mapping, from either Compose form."""
    raw = service.get("environment") or {}
    if isinstance(raw, dict):
        return {str(key): str(value) for key, value in raw.items()}
    pairs = (str(item).partition("=") for item in raw)
    return {name: value for name, _, value in pairs}


def env_file_variables(path: Path) -> dict[str, tuple[str, bool]]:
    """Map each variable in an env file to its value and whether it is set."""
    found: dict[str, tuple[str, bool]] = {}
    for line in path.read_text().splitlines():
        match = ENV_LINE.match(line.strip())
        if match:
            found[match["name"]] = (match["value"], match["comment"] is None)
    return found


def dockerfile_instructions() -> list[tuple[str, str]]:
    """Return the Dockerfile's instructions as (KEYWORD, arguments), lines joined."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        keyword, _, arguments = stripped.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def dockerfile_values(keyword: str) -> list[str]:
    return [args for key, args in dockerfile_instructions() if key == keyword]


def unit_values(name: str, key: str) -> list[str]:
    """Return every value of ``key`` in a systemd unit, in file order."""
    values = []
    for line in (DEPLOY / name).read_text().splitlines():
        field, sep, value = line.partition("=")
        if sep and field.strip() == key:
            values.append(value.strip())
    return values


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


# -- docker-compose.yml ---------------------------------------------------


@pytest.mark.parametrize("name", ["api", "postgres", "worker"])
def test_compose_service_exists(services: dict[str, Any], name: str) -> None:
    assert name in services, f"docker-compose.yml has no service {name!r}"


def test_compose_postgres_user_is_vod(services: dict[str, Any]) -> None:
    assert environment(services["postgres"]).get("POSTGRES_USER") == "vod"


def test_compose_postgres_database_is_vod(services: dict[str, Any]) -> None:
    assert environment(services["postgres"]).get("POSTGRES_DB") == "vod"


def test_compose_postgres_healthcheck_uses_pg_isready(
    services: dict[str, Any],
) -> None:
    test = as_argv(services["postgres"]["healthcheck"]["test"])
    assert test[1:] == ["pg_isready", "-U", "vod", "-d", "vod"]


def test_compose_worker_has_no_container_name(services: dict[str, Any]) -> None:
    assert "container_name" not in services["worker"]


def test_compose_worker_has_no_ports(services: dict[str, Any]) -> None:
    assert "ports" not in services["worker"]


def test_compose_api_publishes_port_8080(services: dict[str, Any]) -> None:
    assert "8080:8080" in services["api"].get("ports", [])


@pytest.mark.parametrize("name", VODQ_SERVICES)
def test_compose_command_starts_with_vodq(services: dict[str, Any], name: str) -> None:
    assert as_argv(services[name]["command"])[0] == "vodq"


@pytest.mark.parametrize("name", VODQ_SERVICES)
def test_compose_command_subcommand_exists(services: dict[str, Any], name: str) -> None:
    subcommand = as_argv(services[name]["command"])[1]
    assert subcommand in subcommands(), f"{name}: vodq has no command {subcommand!r}"


def test_compose_commands_parse(services: dict[str, Any]) -> None:
    """Every service built from this repository runs a command vodq accepts."""
    for name, service in services.items():
        if "build" not in service:
            continue
        argv = as_argv(service["command"])
        assert parses(argv[1:]), f"{name}: vodq rejects {shlex.join(argv)!r}"


@pytest.mark.parametrize("name", VODQ_SERVICES)
def test_compose_environment_is_known(services: dict[str, Any], name: str) -> None:
    unknown = set(environment(services[name])) - set(KNOWN_VARIABLES)
    assert not unknown, f"{name} sets variables vodq does not read: {unknown}"


@pytest.mark.parametrize("name", VODQ_SERVICES)
def test_compose_env_file_is_optional(services: dict[str, Any], name: str) -> None:
    assert {"path": "backend/.env", "required": False} in services[name]["env_file"]


def test_compose_dsn_is_valid(services: dict[str, Any]) -> None:
    dsn = substitute_defaults(environment(services["api"])["DB_DSN"])
    settings = load_settings({"DB_DSN": dsn}, env_file=None)
    assert settings.db_dsn.startswith("postgresql+psycopg://")


def test_compose_dsn_is_shared(services: dict[str, Any]) -> None:
    api_dsn = environment(services["api"])["DB_DSN"]
    assert environment(services["worker"])["DB_DSN"] == api_dsn


def test_compose_dsn_matches_postgres(services: dict[str, Any]) -> None:
    """The DSN's host, user, password and database are those of the postgres service."""
    url = make_url(substitute_defaults(environment(services["api"])["DB_DSN"]))
    postgres = {
        key: substitute_defaults(value)
        for key, value in environment(services["postgres"]).items()
    }
    expected = ("postgres", "vod", postgres["POSTGRES_PASSWORD"], "vod")
    assert (url.host, url.username, url.password, url.database) == expected


def test_compose_data_dir_is_a_volume(services: dict[str, Any]) -> None:
    for name in VODQ_SERVICES:
        data_dir = environment(services[name])["DATA_DIR"]
        targets = [str(volume).split(":")[1] for volume in services[name]["volumes"]]
        assert data_dir in targets, f"{name}: DATA_DIR {data_dir} is not a volume"


# -- Dockerfile -------------------------------------------------------------


def test_dockerfile_cmd_is_exec_form() -> None:
    cmd = dockerfile_values("CMD")[-1]
    assert isinstance(json.loads(cmd), list), f"CMD {cmd} is not a JSON list"


def test_dockerfile_cmd_subcommand_exists() -> None:
    argv = json.loads(dockerfile_values("CMD")[-1])
    assert argv[0] == "vodq"
    assert parses(argv[1:]), f"vodq rejects the CMD {argv}"


def test_dockerfile_installs_ffmpeg() -> None:
    installs = [
        args
        for args in dockerfile_values("RUN")
        if re.search(r"apt-get install\b.*\bffmpeg\b", args)
    ]
    assert installs, "no RUN line installs the Debian package ffmpeg"


def test_dockerfile_user_is_not_root() -> None:
    users = dockerfile_values("USER")
    assert users, "the Dockerfile has no USER instruction"
    assert users[-1] not in ("root", "0")


def test_dockerfile_stop_signal_is_sigterm() -> None:
    assert dockerfile_values("STOPSIGNAL") == ["SIGTERM"]


def test_dockerfile_data_dir_is_volume() -> None:
    assert "DATA_DIR=/data" in dockerfile_values("ENV")
    assert dockerfile_values("VOLUME") == ["/data"]


def test_dockerignore_excludes_env_files() -> None:
    patterns = DOCKERIGNORE.read_text().splitlines()
    assert ".env" in patterns
    assert "backend/" in patterns


# -- systemd units and the settings example ------------------------------


@pytest.mark.parametrize(
    ("unit", "subcommand"),
    [("vodq.service", "serve"), ("vodq-worker.service", "worker")],
)
def test_unit_exec_start_runs_subcommand(unit: str, subcommand: str) -> None:
    argv = shlex.split(unit_values(unit, "ExecStart")[0])
    assert argv[:2] == [VENV_VODQ, subcommand]


@pytest.mark.parametrize("unit", UNITS)
def test_unit_exec_start_parses(unit: str) -> None:
    argv = shlex.split(unit_values(unit, "ExecStart")[0])
    assert parses(argv[1:]), f"{unit}: vodq rejects {shlex.join(argv)!r}"


@pytest.mark.parametrize("unit", UNITS)
def test_unit_environment_file_path(unit: str) -> None:
    assert unit_values(unit, "EnvironmentFile") == ["/etc/vodq/vodq.env"]


@pytest.mark.parametrize("unit", UNITS)
def test_unit_user_is_vodq(unit: str) -> None:
    assert unit_values(unit, "User") == ["vodq"]


@pytest.mark.parametrize("unit", UNITS)
def test_unit_data_dir_is_writable(unit: str) -> None:
    """ProtectSystem=strict leaves DATA_DIR read-only unless ReadWritePaths has it."""
    data_dir = Path(env_file_variables(ENV_EXAMPLE)["DATA_DIR"][0])
    writable = [Path(path) for path in unit_values(unit, "ReadWritePaths")]
    assert any(data_dir.is_relative_to(path) for path in writable)


def test_env_example_variables_are_known() -> None:
    unknown = set(env_file_variables(ENV_EXAMPLE)) - set(KNOWN_VARIABLES)
    assert not unknown, f"vodq.env.example names unknown variables: {unknown}"


def test_env_example_lists_every_variable() -> None:
    missing = set(KNOWN_VARIABLES) - set(env_file_variables(ENV_EXAMPLE))
    assert not missing, f"vodq.env.example does not mention {missing}"


def test_env_example_loads(tmp_path: Path) -> None:
    """The example's set values, and each commented-out example value, are valid."""
    variables = env_file_variables(ENV_EXAMPLE)
    example = tmp_path / "vodq.env"
    example.write_text(
        "".join(f"{name}={value}\n" for name, (value, _) in variables.items())
    )
    settings = load_settings({}, env_file=example)
    assert settings.data_dir == Path("/var/lib/vodq")
