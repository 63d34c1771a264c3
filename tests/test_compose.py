"""docker-compose.yml without a Docker engine: every command a service runs must parse with the real CLIs."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import typer.main
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def interpolate(value: str) -> str:
    """Compose variable substitution with defaults taken and required variables given a placeholder."""
    value = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m.group(2), value)
    value = re.sub(r"\$\{(\w+)(:?\?[^}]*)?\}", lambda m: f"<{m.group(1)}>", value)
    return value.replace("$$", "$")


def command(service: str) -> list[str]:
    cmd = SERVICES[service]["command"]
    assert isinstance(cmd, list), f"{service}: use the exec form (a list) for command"
    return [interpolate(str(part)) for part in cmd]


def parse(group, argv: list[str]) -> tuple[list[str], object]:
    """Resolve the sub-command path of ``argv`` in a click group and parse the options of the command it reaches
    (``make_context`` raises on an unknown command or option). Works for typer's vendored click and for click."""
    names: list[str] = []
    ctx = group.make_context(group.name or "cli", list(argv))
    current = group
    while hasattr(current, "get_command"):
        # a group keeps the sub-command name apart from the remaining arguments
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        assert rest, f"{' '.join(argv)}: no sub-command"
        name, rest = rest[0], rest[1:]
        sub = current.get_command(ctx, name)
        assert sub is not None, f"{' '.join(argv)}: {name!r} is not a command of {current.name}"
        names.append(name)
        ctx = sub.make_context(name, list(rest), parent=ctx)
        current = sub
    return names, ctx


APP_SERVICES = [name for name, spec in SERVICES.items() if spec.get("command") and command(name)[0] == "captcha-queue"]


def test_services_present():
    assert {"redis", "postgres", "migrate", "worker", "worker-cpu", "trainer", "producer", "flower"} <= set(SERVICES)
    assert set(APP_SERVICES) == {"migrate", "worker", "worker-cpu", "trainer", "producer"}


@pytest.mark.parametrize("service", APP_SERVICES)
def test_app_commands_are_real_subcommands(service):
    cli = typer.main.get_command(importlib.import_module("core.cli").app)
    names, ctx = parse(cli, command(service)[1:])
    expected = {"migrate": ["db", "upgrade"], "worker": ["worker"], "worker-cpu": ["worker"], "trainer": ["worker"],
                "producer": ["enqueue"]}  # fmt: skip
    assert names == expected[service]
    if service == "trainer":
        assert ctx.params["queues"] == "train" and ctx.params["device"].startswith("cuda")
    if service == "worker":
        assert ctx.params["device"].startswith("cuda") and ctx.params["concurrency"] == 1
    if service == "worker-cpu":
        assert ctx.params["device"] == "cpu" and ctx.params["concurrency"] >= 1


def test_flower_runs_celery_flower_on_the_project_app():
    from celery import Celery
    from celery.bin.celery import celery

    argv = command("flower")
    assert argv[0] == "celery"
    app_option = next(a for a in argv if a.startswith("--app="))
    app = getattr(importlib.import_module(app_option.split("=", 1)[1]), "app")
    assert isinstance(app, Celery) and app.main == "captcha_queue"
    names, _ = parse(celery, [a for a in argv[1:] if a != app_option])
    assert names == ["flower"]


def test_gpu_reservation_profiles_and_order():
    worker = SERVICES["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert SERVICES["worker-cpu"]["profiles"] == ["cpu"]
    assert SERVICES["producer"]["profiles"] == ["producer"]
    assert SERVICES["trainer"]["profiles"] == ["train"]
    assert SERVICES["migrate"]["restart"] == "no"
    for name in ("worker", "worker-cpu", "trainer", "producer"):
        assert SERVICES[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_ports_are_local_and_secrets_come_from_the_environment():
    for name, spec in SERVICES.items():
        for port in spec.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
    text = (ROOT / "docker-compose.yml").read_text()
    assert SERVICES["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert "${REDIS_PASSWORD:?" in SERVICES["worker"]["environment"]["CAPTCHA_BROKER_URL"]
    assert not re.search(r"PASSWORD:\s*['\"]?[A-Za-z0-9]", text), "no literal passwords"


def test_published_checkpoints_are_shared_by_every_app_service():
    """A version row stores its file's absolute path: the store must be the same volume at the same path for the
    trainer that writes it and every worker that loads it."""
    for name in APP_SERVICES:
        spec = SERVICES[name]
        assert spec["environment"]["CAPTCHA_CHECKPOINT_DIR"] == "/checkpoints", name
        assert "checkpoints:/checkpoints" in spec["volumes"], name
    assert "checkpoints" in COMPOSE["volumes"]
    assert re.search(r"chown captcha /checkpoints", (ROOT / "Dockerfile").read_text())


def test_dockerfile_installs_the_project_and_runs_unprivileged():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", dockerfile, re.M)
    assert 'pip install ".[monitor]"' in dockerfile  # flower comes with the image
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M)
    for package in ("core", "db", "worker", "producer"):
        assert re.search(rf"^COPY {package} {package}$", dockerfile, re.M)
