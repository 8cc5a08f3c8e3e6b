"""docker-compose.yml, .env.example, Procfile, Procfile.dev and .env.dev: valid, and everything they
run exists in the installed package.

There is no Docker here. The compose file is validated against the compose-spec schema bundled
with check-jsonschema, and every command of ours (a service's command, its health check, a
Procfile line) is resolved the way the process would resolve it: the console script in the venv,
the Celery app and subcommand with its options parsed by Celery's own click command, the queues the
app routes to, the `animate-queue` subcommands and options parsed by its click group, `python -m`
modules imported and their argument parsers run, and files that must exist.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import click
import pytest
from dockerfile_parse import DockerfileParser
from honcho.environ import parse as parse_honcho_env
from honcho.environ import parse_procfile
from ruamel.yaml import YAML

from config.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
ENV_DEV = ROOT / ".env.dev"

SETTINGS = {name.upper() for name in Settings.model_fields}
# Read by boto3 (credentials) or by billiard/Celery (REMAP_SIGTERM), not by our Settings.
EXTERNAL = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "REMAP_SIGTERM"}
SECRET_NAME = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|AUTH|ACCOUNTS")
REAL_LOOKING_SECRET = re.compile(
    r"sk-[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|whsec_[A-Za-z0-9+/=]{20,}|[A-Za-z0-9+/]{40}"
)
# What the tests put in for the secrets .env.example leaves empty.
FILLED = {
    "DASHSCOPE_API_KEY": "test-placeholder",
    "MINIO_ROOT_PASSWORD": "test-placeholder-password",
    "AWS_ACCESS_KEY_ID": "animate-queue-worker",
    "AWS_SECRET_ACCESS_KEY": "test-placeholder-worker-secret",
    "REDIS_PASSWORD": "testplaceholderredis",
    "FLOWER_BASIC_AUTH": "admin:test-placeholder",
    "CONSOLE_BASIC_AUTH": "ops:test-placeholder",
}
# What only the workers may hold (never beat, Flower or the exporter).
WORKER_SECRETS = ("DASHSCOPE_API_KEY", "DASHSCOPE_ACCOUNTS", "AWS_ACCESS_KEY_ID",
                  "AWS_SECRET_ACCESS_KEY", "WEBHOOK_SECRET", "MINIO_ROOT_PASSWORD")  # fmt: skip


# --- reading the files -----------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    data: dict[str, Any] = YAML(typ="safe").load(COMPOSE.read_text())
    return data


def services() -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = load_compose()["services"]
    return result


def ours(compose_services: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The services that run our image (built from the Dockerfile)."""
    return {name: svc for name, svc in compose_services.items() if "build" in svc}


def env_example() -> tuple[dict[str, str], set[str]]:
    """(the values set in .env.example, every variable it documents, set or commented out)."""
    active: dict[str, str] = {}
    documented: set[str] = set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.fullmatch(r"(#\s*)?([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if not m:
            continue
        documented.add(m.group(2))
        if m.group(1) is None:
            value = m.group(3)
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            active[m.group(2)] = value
    return active, documented


def filled_env() -> dict[str, str]:
    """.env.example as an operator fills it in: the three secrets set, nothing else changed."""
    active, _ = env_example()
    return {**active, **FILLED}


# --- compose interpolation (https://docs.docker.com/reference/compose-file/interpolation/) -----


class MissingVariable(Exception):
    pass


def _closing_brace(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced ${{ in {text!r}")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's (and the shell's) ${VAR}, ${VAR:-default}, ${VAR-d}, ${VAR:?err}, ${VAR:+alt},
    $VAR and $$, nested defaults included."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] != "$":
            out.append(text[i])
            i += 1
            continue
        nxt = text[i + 1 : i + 2]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "{":
            end = _closing_brace(text, i + 1)
            out.append(_expand(text[i + 2 : end], env))
            i = end + 1
        elif m := re.match(r"[A-Za-z_][A-Za-z0-9_]*", text[i + 1 :]):
            out.append(env.get(m.group(), ""))
            i += 1 + len(m.group())
        else:
            out.append("$")
            i += 1
    return "".join(out)


def _expand(body: str, env: Mapping[str, str]) -> str:
    m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?", body, re.S)
    assert m, f"not a compose variable: ${{{body}}}"
    name, op, arg = m.groups()
    value = env.get(name)
    if op is None:
        return value or ""
    present = bool(value) if op.startswith(":") else value is not None
    if op.endswith("-"):
        return value if present and value is not None else interpolate(arg, env)
    if op.endswith("?"):
        if not present or value is None:
            raise MissingVariable(f"{name}: {arg}")
        return value
    return interpolate(arg, env) if present else ""


def variables(text: str) -> set[str]:
    """Every variable a compose file or shell line interpolates ($$ is a literal dollar)."""
    text = text.replace("$$", "")
    return set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text))


def defaults_of(text: str, name: str) -> list[str]:
    """The default values ${name:-...} / ${name-...} give, nested variables removed."""
    found = []
    for m in re.finditer(r"\$\{" + name + r":?-", text):
        end = _closing_brace(text, m.start() + 1)
        default = text[m.end() : end]
        found.append(re.sub(r"\$\{[^}]*\}+", "", default))
    return found


def compose_values() -> str:
    """Every string value of the compose file, keys included (comments are not interpolated)."""

    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)
        elif isinstance(node, dict):
            for key, item in node.items():
                yield str(key)
                yield from walk(item)

    return "\n".join(walk(load_compose()))


def resolved(value: Any, env: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return interpolate(value, env)
    if isinstance(value, list):
        return [resolved(v, env) for v in value]
    if isinstance(value, dict):
        return {k: resolved(v, env) for k, v in value.items()}
    return value


# --- resolving a command to something that exists ----------------------------------------------


def routed_queues() -> set[str]:
    from config.celery_app import app

    queues = {route["queue"] for route in app.conf.task_routes.values()}
    return queues | {app.conf.task_default_queue}


def split_env(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Leading NAME=value words (a shell's per-command environment), and the command."""
    env: dict[str, str] = {}
    while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
        name, _, value = argv[0].partition("=")
        env[name] = value
        argv = argv[1:]
    return env, argv


def check_click(cmd: click.Command, args: list[str], name: str, parent: click.Context) -> None:
    """Parse ``args`` with ``cmd`` exactly as its CLI would, without running it."""
    if isinstance(cmd, click.Group):
        assert args, f"{name}: no subcommand given"
        ctx = click.Context(cmd, info_name=name, parent=parent)
        sub = cmd.get_command(ctx, args[0])
        assert sub is not None, f"{name} has no subcommand {args[0]!r}"
        check_click(sub, args[1:], args[0], ctx)
        return
    try:
        ctx = cmd.make_context(name, list(args), parent=parent)
    except click.UsageError as exc:
        raise AssertionError(f"{name} {shlex.join(args)}: {exc.format_message()}") from None
    assert not ctx.args, f"{name}: unexpected arguments {ctx.args}"


def celery_options(argv: list[str]) -> dict[str, Any]:
    """Check a `celery ...` command; return the subcommand, its parsed params and raw options."""
    from celery import Celery
    from celery.bin.base import CLIContext
    from celery.bin.celery import celery as celery_group

    rest = list(argv)
    app_name = None
    while rest and rest[0].startswith("-"):
        opt = rest.pop(0)
        if opt in ("-A", "--app"):
            app_name = rest.pop(0)
        elif opt.startswith("--app="):
            app_name = opt.split("=", 1)[1]
        else:
            raise AssertionError(f"celery: unexpected global option {opt}")
    assert app_name, f"celery {shlex.join(argv)}: no -A"
    module_name, _, attr = app_name.partition(":")
    app = getattr(importlib.import_module(module_name), attr or "app")
    assert isinstance(app, Celery), f"{app_name} is not a Celery app"
    assert rest, "celery: no subcommand"
    sub, args = rest[0], rest[1:]
    root = click.Context(
        celery_group, info_name="celery", obj=CLIContext(app=app, no_color=True, workdir=None)
    )
    cmd = celery_group.get_command(root, sub)
    assert cmd is not None, f"celery has no subcommand {sub!r}"
    if sub == "flower":
        # Flower takes tornado options (--name=value), not click ones.
        from flower.options import options as flower_options

        known = set(flower_options._options)
        for arg in args:
            m = re.fullmatch(r"--([a-z_-]+)(=.*)?", arg)
            assert m, f"flower: {arg!r} is not an --option=value"
            assert m.group(1).replace("_", "-") in known, f"flower has no option {arg}"
            if m.group(1) == "conf":
                conf = m.group(2)[1:]
                assert (ROOT / conf).is_file(), f"flower --conf: {conf} does not exist"
        return {"sub": sub, "args": args, "params": {}}
    try:
        ctx = cmd.make_context(sub, list(args), parent=root)
    except click.UsageError as exc:
        raise AssertionError(f"celery {sub} {shlex.join(args)}: {exc.format_message()}") from None
    assert not ctx.args, f"celery {sub}: unexpected arguments {ctx.args}"
    if sub == "worker":
        queues = set(ctx.params["queues"] or [])
        assert queues, "a worker without -Q would consume only the default queue"
        assert queues <= routed_queues(), f"-Q names queues nothing is routed to: {queues}"
    return {"sub": sub, "args": args, "params": ctx.params}


def check_argv(argv: list[str]) -> dict[str, Any]:
    """Assert that a command of ours would start; return what was found about it."""
    _, argv = split_env(argv)
    assert argv, "an empty command"
    exe, args = argv[0], argv[1:]
    assert (BIN / exe).is_file(), f"{exe} is not installed in {BIN}"
    if exe == "celery":
        return {"exe": exe, **celery_options(args)}
    if exe == "animate-queue":
        from workers.entrypoints.cli import main

        check_click(main, args, "animate-queue", click.Context(click.Group("root")))
        return {"exe": exe, "args": args}
    if exe in ("python", "python3"):
        if args[0] == "-c":
            compile(args[1], "<command>", "exec")
            return {"exe": exe, "code": args[1]}
        assert args[0] == "-m", f"python {shlex.join(args)}: only -m and -c are expected"
        module = importlib.import_module(args[1])
        parse_args = getattr(module, "parse_args", None)
        if parse_args is None and importlib.util.find_spec(args[1] + ".__main__"):
            parse_args = getattr(importlib.import_module(args[1] + ".__main__"), "parse_args", None)
        if parse_args is not None:
            try:
                parse_args(args[2:])
            except SystemExit as exc:
                raise AssertionError(f"python -m {shlex.join(args[1:])}: bad arguments") from exc
        return {"exe": exe, "module": args[1], "args": args[2:]}
    raise AssertionError(f"{exe}: not a command this project provides")


def service_argv(svc: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    command = resolved(svc["command"], env)
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if "entrypoint" in svc:
        entry = resolved(svc["entrypoint"], env)
        argv = (shlex.split(entry) if isinstance(entry, str) else list(entry)) + argv
    return argv


def health_argv(svc: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    test = resolved(svc["healthcheck"]["test"], env)
    if isinstance(test, str):
        test = ["CMD-SHELL", test]
    kind, *rest = test
    if kind == "CMD":
        return list(rest)
    assert kind == "CMD-SHELL", f"health check kind {kind}"
    (line,) = rest
    assert not re.search(r"[|;&<>`]", line), f"keep our health checks one command: {line}"
    return shlex.split(line)


def parse_duration(text: str) -> float:
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text}"
    return sum(float(n) * units[u] for n, u in parts)


def image_env() -> dict[str, str]:
    envs: dict[str, str] = DockerfileParser(path=str(ROOT / "Dockerfile")).envs
    return dict(envs)


def effective_env(svc: Mapping[str, Any], dotenv: Mapping[str, str]) -> dict[str, str]:
    """A container's environment: the image's ENV, then env_file (.env: the workers only), then
    `environment:`."""
    from_file = dotenv if svc.get("env_file") == ".env" else {}
    environment = {k: str(v) for k, v in resolved(svc.get("environment", {}), dotenv).items()}
    return {**image_env(), **from_file, **environment}


def mounted(svc: Mapping[str, Any], path: str) -> bool:
    targets = [v.split(":")[1] for v in svc.get("volumes", []) if isinstance(v, str)]
    return any(path == t or path.startswith(t.rstrip("/") + "/") for t in targets)


# --- the compose file ----------------------------------------------------------------------


def test_compose_file_matches_the_compose_spec(tmp_path: Path) -> None:
    tool = BIN / "check-jsonschema"
    run = [str(tool), "--builtin-schema", "vendor.compose-spec"]
    ok = subprocess.run([*run, str(COMPOSE)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # The same check refuses a file with a misspelt service key, so the pass above means something.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period:", "stop_grace_periods:", 1))
    bad = subprocess.run([*run, str(broken)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "stop_grace_periods" in bad.stdout


def test_compose_file_has_no_obsolete_version_and_a_project_name() -> None:
    data = load_compose()
    assert "version" not in data  # obsolete in the Compose spec
    assert data["name"] == "animate-queue"  # volume names do not depend on the checkout's folder


def test_every_command_of_ours_resolves_to_something_installed() -> None:
    env = filled_env()
    checked = []
    for name, svc in ours(services()).items():
        checked.append(check_argv(service_argv(svc, env)))
        checked.append(check_argv(health_argv(svc, env)))
        assert svc.get("restart") == "unless-stopped", name
    exes = {c["exe"] for c in checked}
    assert exes == {"celery", "animate-queue", "python"}
    # The health commands are the ones being added to `animate-queue health`.
    health = {tuple(c["args"][:2]) for c in checked if c["exe"] == "animate-queue"}
    assert {("health", k) for k in ("worker", "beat", "flower", "exporter", "console")} <= health


def test_our_services_share_one_image_built_from_the_dockerfile() -> None:
    mine = ours(services())
    assert {svc["build"] for svc in mine.values()} == {"."}
    assert len({svc["image"] for svc in mine.values()}) == 1
    assert (ROOT / "Dockerfile").is_file()


def workers() -> dict[str, dict[str, Any]]:
    env = filled_env()
    found = {}
    for name, svc in ours(services()).items():
        info = check_argv(service_argv(svc, env))
        if info.get("sub") == "worker":
            found[name] = {"svc": svc, **info}
    return found


def test_workers_consume_every_routed_queue_under_their_own_names() -> None:
    env = filled_env()
    found = workers()
    assert set(found) == {"worker-remote", "worker-transfer"}
    queues = {name: set(w["params"]["queues"]) for name, w in found.items()}
    assert queues == {"worker-remote": {"celery", "dashscope"}, "worker-transfer": {"transfer"}}
    # No task is routed to a queue nobody reads.
    assert set().union(*queues.values()) == routed_queues()
    nodes = set()
    for name, w in found.items():
        argv = service_argv(w["svc"], env)
        node = argv[argv.index("-n") + 1]
        nodes.add(node)
        health = health_argv(w["svc"], env)
        # The health check pings exactly this container's node (%h expands the same way).
        assert health[:3] == ["animate-queue", "health", "worker"], name
        assert health[health.index("--name") + 1] == node, name
    assert len(nodes) == len(found)


def test_worker_grace_period_outlasts_the_soft_shutdown() -> None:
    from config.celery_app import app

    soft = float(app.conf.worker_soft_shutdown_timeout)
    assert soft > 0
    for name, w in workers().items():
        grace = parse_duration(w["svc"]["stop_grace_period"])
        assert grace > soft + 10, f"{name}: {grace} s leaves no time to requeue after {soft} s"
        # Without REMAP_SIGTERM=SIGQUIT, Docker's SIGTERM is a warm shutdown that ignores the
        # soft-shutdown timeout and waits for every running task (a copy: up to 240 s).
        assert effective_env(w["svc"], filled_env()).get("REMAP_SIGTERM") == "SIGQUIT", name


def test_workers_are_sized_separately() -> None:
    found = workers()
    remote = found["worker-remote"]["params"]["concurrency"]
    transfer = found["worker-transfer"]["params"]["concurrency"]
    assert remote > transfer  # many short quota-bound calls vs. a few long copies
    env = filled_env()
    limits = {n: resolved(w["svc"]["mem_limit"], env) for n, w in found.items()}
    assert all(re.fullmatch(r"\d+[kmg]", v) for v in limits.values()), limits


def test_services_wait_for_healthy_dependencies() -> None:
    svcs = services()
    for name, svc in ours(svcs).items():
        if name == "emulator":
            continue
        depends = svc["depends_on"]
        assert depends["redis"] == {"condition": "service_healthy"}, name
    for name in workers():
        depends = svcs[name]["depends_on"]
        assert depends["minio"] == {"condition": "service_healthy"}, name
        assert depends["minio-init"] == {"condition": "service_completed_successfully"}, name
    # Every long-running service says when it is healthy; the one-shot init does not run long.
    for name, svc in svcs.items():
        if name != "minio-init":
            assert svc["healthcheck"]["test"], name
    assert svcs["minio-init"]["restart"] == "no"


def test_exactly_one_beat_with_its_schedule_on_a_volume() -> None:
    env = filled_env()
    beats = []
    for name, svc in ours(services()).items():
        info = check_argv(service_argv(svc, env))
        if info.get("sub") == "beat":
            beats.append((name, svc, info))
    assert len(beats) == 1
    _, svc, info = beats[0]
    assert "deploy" not in svc and "scale" not in svc
    assert mounted(svc, info["params"]["schedule"])
    assert health_argv(svc, env) == ["animate-queue", "health", "beat"]


def test_emulator_runs_only_in_its_profile() -> None:
    svcs = services()
    env = filled_env()
    emulators = [
        name
        for name, svc in ours(svcs).items()
        if check_argv(service_argv(svc, env)).get("module") == "emulator"
    ]
    assert emulators == ["emulator"]
    for name, svc in svcs.items():
        profile = ["emulator"] if name == "emulator" else ["ha"] if name in HA_SERVICES else []
        assert svc.get("profiles", []) == profile, name
        assert "emulator" not in svc.get("depends_on", {}), name
    assert "ports" not in svcs["emulator"]  # its admin API has no auth
    argv = service_argv(svcs["emulator"], env)
    from emulator.__main__ import parse_args

    args = parse_args(argv[3:])
    assert (args.host, args.port) == ("0.0.0.0", 8765)
    # What .env.example tells a trial to uncomment points at it.
    assert f"# DASHSCOPE_BASE_URL=http://emulator:{args.port}/api/v1" in ENV_EXAMPLE.read_text()
    assert args.public_url == f"http://emulator:{args.port}"
    assert "# URL_ALLOWLIST=emulator" in ENV_EXAMPLE.read_text()


HA_SERVICES = ("redis-a", "redis-b", "sentinel-1", "sentinel-2", "sentinel-3")


def test_the_ha_profile_is_a_master_a_replica_and_three_sentinels() -> None:
    """docs/ha.md: persistent nodes with the password (replication authenticates too), redis-b
    a replica of redis-a, three Sentinels monitoring redis-a under REDIS_MASTER_NAME's default
    with a quorum of two; nothing of ours depends on them (REDIS_SENTINELS opts in)."""
    svcs = services()
    env = filled_env()
    for name in ("redis-a", "redis-b"):
        argv = [interpolate(str(a), env) for a in svcs[name]["command"]]
        pairs = dict(zip(argv[1::2], argv[2::2], strict=False))
        assert pairs["--appendonly"] == "yes" and pairs["--maxmemory-policy"] == "noeviction"
        assert pairs["--requirepass"] == pairs["--masterauth"] == env["REDIS_PASSWORD"]
        assert pairs["--replica-announce-ip"] == name
        assert mounted(svcs[name], "/data")
    replica = [interpolate(str(a), env) for a in svcs["redis-b"]["command"]]
    assert replica[replica.index("--replicaof") + 1 :] == ["redis-a", "6379"]
    master = Settings.model_fields["redis_master_name"].default
    for name in HA_SERVICES[2:]:
        script = svcs[name]["command"][0]
        assert f"sentinel monitor {master} redis-a 6379 2" in script, name
        assert f"sentinel auth-pass {master} $$REDIS_PASSWORD" in script, name
        assert svcs[name]["environment"]["HOSTNAME_ANNOUNCED"] == name
    for name, svc in ours(svcs).items():
        assert not set(svc.get("depends_on", {})) & set(HA_SERVICES), name
    base = svcs["worker-remote"]["environment"]
    assert {"REDIS_SENTINELS", "REDIS_SENTINEL_PASSWORD", "REDIS_MASTER_NAME"} <= set(base)


def test_flower_requires_basic_auth_and_keeps_its_state() -> None:
    svc = services()["flower"]
    env = filled_env()
    info = check_argv(service_argv(svc, env))
    assert info["sub"] == "flower"
    assert "--conf=config/flowerconfig.py" in info["args"]
    assert svc["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    assert "FLOWER_ALLOW_NO_AUTH" not in compose_values()
    active, _ = env_example()
    assert "FLOWER_ALLOW_NO_AUTH" not in active
    flower_env = effective_env(svc, env)
    assert mounted(svc, flower_env["FLOWER_DB"])
    assert load_settings(flower_env).flower_port == 5555
    assert any(p.endswith(":5555:5555") for p in svc["ports"])


def test_exporter_listens_where_it_is_published() -> None:
    svc = services()["exporter"]
    env = filled_env()
    assert check_argv(service_argv(svc, env))["args"] == ["metrics"]
    settings = load_settings(effective_env(svc, env))
    assert (settings.metrics_addr, settings.metrics_port) == ("0.0.0.0", 9808)
    assert any(p.endswith(f":{settings.metrics_port}:9808") for p in resolved(svc["ports"], env))


def test_redis_is_persistent_and_never_evicts() -> None:
    svc = services()["redis"]
    command = " ".join(svc["command"])
    assert "--appendonly yes" in command
    assert "--appendfsync everysec" in command
    assert "--maxmemory-policy noeviction" in command
    assert "--hash-max-listpack-value 1024" in command  # job records in the compact encoding
    assert mounted(svc, "/data")
    assert svc["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]  # REDISCLI_AUTH set
    assert svc["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD:?")
    assert all(p.startswith("127.0.0.1:") for p in svc["ports"])


def test_minio_bucket_is_created_idempotently() -> None:
    svcs = services()
    init = svcs["minio-init"]
    script = " ".join(init["command"])
    assert "mc mb --ignore-existing" in script
    assert '"local/$$S3_BUCKET"' in script
    assert "/minio/health/live" in " ".join(svcs["minio"]["healthcheck"]["test"])
    assert svcs["minio"]["environment"]["MINIO_API_STALE_UPLOADS_EXPIRY"] == "48h"
    assert all(p.startswith("127.0.0.1:") for p in svcs["minio"]["ports"])
    for svc in (svcs["minio"], init):
        assert ":latest" not in svc["image"] and "RELEASE." in svc["image"]


# --- configuration: .env.example and the environment our services get --------------------------


def test_every_interpolated_variable_is_documented_in_env_example() -> None:
    _, documented = env_example()
    missing = variables(compose_values()) - documented
    assert not missing, f"document these in .env.example: {sorted(missing)}"


def test_env_example_documents_every_setting_and_nothing_unknown() -> None:
    _, documented = env_example()
    missing = SETTINGS - documented
    assert not missing, f"settings missing from .env.example: {sorted(missing)}"
    unknown = documented - SETTINGS - EXTERNAL - variables(compose_values())
    assert not unknown, f".env.example documents variables nothing reads: {sorted(unknown)}"


def test_environment_our_services_get_is_read_by_them() -> None:
    for name, svc in ours(services()).items():
        unknown = set(svc.get("environment", {})) - SETTINGS - EXTERNAL
        assert not unknown, f"{name} passes variables nothing reads: {sorted(unknown)}"


def test_compose_refuses_to_start_until_the_secrets_are_filled_in() -> None:
    active, _ = env_example()
    for secret in ("MINIO_ROOT_PASSWORD", "FLOWER_BASIC_AUTH", "CONSOLE_BASIC_AUTH", "REDIS_PASSWORD",
                   "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # fmt: skip
        with pytest.raises(MissingVariable, match=secret):
            resolved(load_compose(), {**filled_env(), secret: active[secret]})
    resolved(load_compose(), filled_env())  # filled in: everything interpolates


def test_filled_env_example_is_a_working_worker_configuration() -> None:
    for name in workers():
        env = effective_env(services()[name], filled_env())
        settings = load_settings(env)
        settings.require_worker()  # a key and a bucket
        assert settings.redis_url == f"redis://:{FILLED['REDIS_PASSWORD']}@redis:6379/0"
        assert settings.aws_endpoint_url == "http://minio:9000"
        assert settings.s3_addressing_style == "path"
        assert settings.aws_request_checksum_calculation == "when_required"
        assert settings.aws_response_checksum_validation == "when_required"
        assert settings.log_format == "json"
        # Their own S3 user, never MinIO's root.
        assert env["AWS_ACCESS_KEY_ID"] == FILLED["AWS_ACCESS_KEY_ID"] != env["MINIO_ROOT_USER"]
        assert env["AWS_SECRET_ACCESS_KEY"] != FILLED["MINIO_ROOT_PASSWORD"]


def test_only_the_workers_get_the_secrets() -> None:
    """Beat, Flower and the exporter run with the Redis URL (its password) and their own
    settings: no DashScope key, no S3 credential, no webhook secret. The workers read .env."""
    env = {**filled_env(), "WEBHOOK_SECRET": "whsec_test", "DASHSCOPE_ACCOUNTS": '{"a": "k"}'}
    for name, svc in ours(services()).items():
        if name in workers() or name == "emulator":
            continue
        assert "env_file" not in svc, name
        got = effective_env(svc, env)
        assert not set(WORKER_SECRETS) & set(got), (name, sorted(set(WORKER_SECRETS) & set(got)))
        settings = load_settings(got)
        assert settings.redis_url == f"redis://:{FILLED['REDIS_PASSWORD']}@redis:6379/0", name
        assert settings.key_prefix == "animate-queue"  # empty means the default
    for name in workers():
        assert services()[name]["env_file"] == ".env"


def test_redis_asks_for_a_password_and_minio_gives_the_workers_their_own_user() -> None:
    svcs = services()
    command = resolved(svcs["redis"]["command"], filled_env())
    assert command[command.index("--requirepass") + 1] == FILLED["REDIS_PASSWORD"]
    script = " ".join(svcs["minio-init"]["command"])
    assert 'mc admin user add local "$$WORKER_KEY" "$$WORKER_SECRET"' in script
    assert "mc admin policy attach local animate-queue-worker" in script
    assert '"s3:PutObjectTagging"' in script and '"s3:AbortMultipartUpload"' in script
    assert '"s3:*"' not in script  # the bucket's objects only, never the admin API


def test_no_secret_has_a_default_or_a_real_looking_value() -> None:
    text = compose_values()
    for name in variables(text):
        if SECRET_NAME.search(name):
            assert all(d == "" for d in defaults_of(text, name)), f"{name} has a default"
    active, _ = env_example()
    for name, value in active.items():
        if SECRET_NAME.search(name):
            assert value == "", f".env.example sets {name}: leave secrets empty"
    for path in (COMPOSE, ENV_EXAMPLE, ENV_DEV, ROOT / "Procfile", ROOT / "Procfile.dev"):
        assert not REAL_LOOKING_SECRET.search(path.read_text()), path.name


# --- Procfile and Procfile.dev -----------------------------------------------------------------


def procfile_commands(path: Path, env: Mapping[str, str]) -> Iterator[tuple[str, list[str]]]:
    processes = parse_procfile(path.read_text()).processes
    assert processes, f"{path.name} has no process"
    for name, line in processes.items():
        yield name, shlex.split(interpolate(line, env))


def test_procfile_runs_every_process_type() -> None:
    found = {name: check_argv(argv) for name, argv in procfile_commands(ROOT / "Procfile", {})}
    assert set(found) == {"flower", "worker_remote", "worker_transfer", "beat", "exporter",
                          "console"}  # fmt: skip
    assert [n for n, f in found.items() if f.get("sub") == "beat"] == ["beat"]
    queues = {n: set(f["params"]["queues"]) for n, f in found.items() if f.get("sub") == "worker"}
    assert queues == {"worker_remote": {"celery", "dashscope"}, "worker_transfer": {"transfer"}}
    assert found["exporter"]["args"] == ["metrics"]
    assert found["console"]["args"] == ["console"]
    lines = parse_procfile((ROOT / "Procfile").read_text()).processes
    assert "--conf=config/flowerconfig.py" in lines["flower"]
    assert "--port=${PORT:-5555}" in lines["flower"]
    flower = dict(procfile_commands(ROOT / "Procfile", {"PORT": "8000"}))["flower"]
    assert "--port=8000" in flower  # the host's PORT wins
    for name in ("worker_remote", "worker_transfer"):
        env, _ = split_env(shlex.split(lines[name]))
        assert env == {"REMAP_SIGTERM": "SIGQUIT"}, name


def dev_env() -> dict[str, str]:
    return dict(parse_honcho_env(ENV_DEV.read_text()))


def test_procfile_dev_runs_the_whole_stack() -> None:
    env = dev_env()
    found = {name: check_argv(argv) for name, argv in procfile_commands(ROOT / "Procfile.dev", env)}
    assert set(found) == {"redis", "s3", "emulator", "worker", "beat", "flower", "exporter",
                          "console"}  # fmt: skip
    assert set(found["worker"]["params"]["queues"]) == routed_queues()
    assert [n for n, f in found.items() if f.get("sub") == "beat"] == ["beat"]
    argv = dict(procfile_commands(ROOT / "Procfile.dev", env))
    from devstack.dev import parse_args as dev_args
    from emulator.__main__ import parse_args as emulator_args

    assert dev_args(argv["redis"][3:]).url == env["REDIS_URL"]
    s3 = dev_args(argv["s3"][3:])
    assert (s3.endpoint, s3.bucket) == (env["AWS_ENDPOINT_URL"], env["S3_BUCKET"])
    emulator = emulator_args(argv["emulator"][3:])
    assert env["DASHSCOPE_BASE_URL"] == f"http://{emulator.host}:{emulator.port}/api/v1"
    assert emulator.api_key == [env["DASHSCOPE_API_KEY"]]


def test_env_dev_is_a_working_loopback_configuration() -> None:
    env = dev_env()
    assert set(env) <= SETTINGS | EXTERNAL, set(env) - SETTINGS - EXTERNAL
    settings = load_settings(env)
    settings.require_worker()
    for url in (settings.redis_url, settings.dashscope_base_url, settings.aws_endpoint_url):
        assert url is not None and "//127.0.0.1:" in url, url
    assert settings.url_allowlist == "127.0.0.1"  # the emulator's videos come from loopback
    assert settings.flower_basic_auth is not None
    assert (settings.metrics_addr, settings.flower_port) == ("127.0.0.1", 5555)


def test_make_dev_runs_procfile_dev_with_honcho() -> None:
    # Under `make test` (as CI runs it) this make is a sub-make: without MAKEFLAGS/MAKELEVEL
    # and with --no-print-directory it prints only the recipe.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", "dev"],
        cwd=ROOT, capture_output=True, text=True, timeout=30, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert "/bin/honcho -e .env.dev -f Procfile.dev start" in last
    assert last.startswith('PATH="') and "/bin:$PATH" in last  # the venv's commands first
