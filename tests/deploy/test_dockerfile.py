"""The Dockerfile and .dockerignore, checked without Docker: a pinned base, a non-root user, build
inputs that exist and reach the build context, this project installed, a default command that
exists, no secret baked in.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import tomllib
from functools import cache
from importlib.metadata import entry_points, requires
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SECRET_NAME = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|AUTH|CREDENTIAL|ACCOUNTS", re.I)
SECRET_VALUE = re.compile(r"sk-[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|whsec_|[A-Za-z0-9+/]{40}")


@cache
def instructions() -> list[dict[str, Any]]:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    return [i for i in parser.structure if i["instruction"] != "COMMENT"]


def of(kind: str) -> list[str]:
    return [i["value"] for i in instructions() if i["instruction"] == kind]


def position(kind: str, last: bool = False) -> int:
    found = [n for n, i in enumerate(instructions()) if i["instruction"] == kind]
    assert found, f"no {kind}"
    return found[-1] if last else found[0]


# --- .dockerignore, matched the way Docker matches it (Go filepath.Match, **, !exceptions) ------


@cache
def ignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            body = pattern[i + 1 : end]
            out += "[" + ("^" + body[1:] if body.startswith("^") else body) + "]"
            i = end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(path: str) -> bool:
    """Whether ``path`` (relative to the context) stays out of the build context."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]  # a dir takes its contents
    result = False
    for pattern in ignore_patterns():
        negate = pattern.startswith("!")
        rx = _regex(pattern.lstrip("!").strip("/"))
        if any(rx.fullmatch(c) for c in candidates):
            result = not negate  # the last matching line wins
    return result


def test_dockerignore_matcher_matches_like_docker() -> None:
    assert ignored(".venv/bin/python")
    assert ignored("workers/__pycache__/cli.cpython-311.pyc")
    assert ignored("stray.pyc")
    assert not ignored("workers/cli.py")
    assert not ignored("README.md")


def test_dockerignore_keeps_local_state_and_secrets_out() -> None:
    for path in (".venv", ".git", ".env", ".env.dev", "demo-output", "tests", "x/__pycache__"):
        assert ignored(path), path


# --- the Dockerfile ------------------------------------------------------------------------------


def copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY and ADD from the build context."""
    found = []
    for inst in instructions():
        if inst["instruction"] not in ("COPY", "ADD"):
            continue
        value = inst["value"].strip()
        words = json.loads(value) if value.startswith("[") else shlex.split(value)
        flags = [w for w in words if w.startswith("--")]
        assert not any(f.startswith("--from") for f in flags), "one stage, no COPY --from"
        *sources, dest = [w for w in words if not w.startswith("--")]
        found.append((sources, dest))
    return found


def test_base_image_is_pinned_to_a_python_minor_version() -> None:
    (base,) = of("FROM")
    image, _, tag = base.partition(":")
    assert image == "python"
    assert tag and "latest" not in tag
    version = re.match(r"(\d+)\.(\d+)", tag)
    assert version, f"pin at least a minor version: {base}"
    minimum = re.search(r"(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"])
    assert minimum and version.groups() >= minimum.groups()


def shell_steps() -> list[list[str]]:
    """Every simple command of every RUN (split on &&)."""
    return [shlex.split(step) for run in of("RUN") for step in run.split("&&") if step.strip()]


def created_user() -> tuple[str, str]:
    """(name, uid) of the user a RUN creates with useradd."""
    (add,) = [s for s in shell_steps() if s[0] == "useradd"]
    return add[-1], add[add.index("--uid") + 1]


def test_it_runs_as_a_non_root_user_created_in_the_image() -> None:
    user = of("USER")[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user in created_user()
    # Nothing runs as root after it, and the default command comes after it.
    assert position("USER", last=True) > position("RUN", last=True)
    assert position("USER", last=True) < position("CMD", last=True)


def test_copied_sources_exist_and_reach_the_build_context() -> None:
    found = copies()
    assert found
    for sources, _ in found:
        for src in sources:
            path = ROOT / src
            assert path.exists(), f"COPY {src}: no such file"
            assert not ignored(src), f"COPY {src}: excluded by .dockerignore"
            files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
            for f in files:
                rel = f.relative_to(ROOT).as_posix()
                if f.suffix == ".py" or "assets" in f.parts:
                    assert not ignored(rel), f"{rel} is needed in the image but ignored"


def test_pip_installs_this_project_after_copying_all_of_it() -> None:
    installs = [
        (n, i["value"])
        for n, i in enumerate(instructions())
        if i["instruction"] == "RUN" and "pip install" in i["value"]
    ]
    assert len(installs) == 1
    where, command = installs[0]
    words = shlex.split(command)
    target = next(w for w in words[words.index("install") + 1 :] if not w.startswith("-"))
    assert target.startswith(".")  # this project, from the copied sources
    extras = re.findall(r"\[(.*)\]", target)
    assert extras == ["emulator"]
    assert set(extras) <= set(PYPROJECT["project"]["optional-dependencies"])
    assert "--no-cache-dir" in words
    # Everything setuptools needs is copied before the install: pyproject, its readme, packages.
    needed = {
        "pyproject.toml",
        PYPROJECT["project"]["readme"],
        *(
            p
            for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
            if "." not in p
        ),
    }
    copied_before = set()
    for n, inst in enumerate(instructions()):
        if n < where and inst["instruction"] in ("COPY", "ADD"):
            copied_before |= {s.rstrip("/") for s in copies_at(inst)}
    assert needed <= copied_before, f"copy these before pip install: {needed - copied_before}"


def copies_at(inst: dict[str, Any]) -> list[str]:
    value = inst["value"].strip()
    words = json.loads(value) if value.startswith("[") else shlex.split(value)
    return [w for w in words if not w.startswith("--")][:-1]


def console_script_owner(name: str) -> str:
    (ep,) = [ep for ep in entry_points(group="console_scripts") if ep.name == name]
    assert ep.dist is not None
    return re.sub(r"[-_.]+", "-", ep.dist.name).lower()


def test_default_command_is_a_worker_on_every_queue() -> None:
    (cmd,) = of("CMD")
    argv = json.loads(cmd)  # exec form: the process gets the signals itself
    assert not of("ENTRYPOINT")
    owner = console_script_owner(argv[0])
    ours = {
        re.split(r"[\s\[<>=!~;]", r)[0].lower()
        for r in requires("animate-queue") or []
        if "extra ==" not in r
    }
    assert owner == "animate-queue" or owner in ours, f"{argv[0]} comes from {owner}"
    assert argv[1:4] == ["-A", "config.celery_app", "worker"]
    app = importlib.import_module("config.celery_app").app
    queues = set(argv[argv.index("-Q") + 1].split(","))
    routed = {r["queue"] for r in app.conf.task_routes.values()} | {app.conf.task_default_queue}
    assert queues == routed


def test_no_secret_is_baked_in() -> None:
    for kind in ("ENV", "ARG"):
        for value in of(kind):
            for name, val in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S*)", value):
                assert not SECRET_NAME.search(name), f"{kind} {name}: pass secrets at run time"
                assert not SECRET_VALUE.search(val), f"{kind} {name} looks like a secret"
    for sources, _ in copies():
        assert not any(s.startswith(".env") for s in sources)


@pytest.mark.parametrize("path", ["config/flowerconfig.py", "devstack/assets/person.png"])
def test_image_holds_files_commands_name_relative_to_workdir(path: str) -> None:
    """Flower's --conf=config/flowerconfig.py and the trial's sample image are WORKDIR-relative."""
    workdir = PurePosixPath(of("WORKDIR")[-1])
    assert (ROOT / path).is_file()
    placed = []
    for sources, dest in copies():
        target = workdir / dest
        for src in sources:
            if path == src or path.startswith(src.rstrip("/") + "/"):
                placed.append(target / PurePosixPath(path).relative_to(src))
    assert workdir / path in placed


def test_writable_data_directory_for_flower_and_beat() -> None:
    env = DockerfileParser(path=str(ROOT / "Dockerfile")).envs
    assert env["FLOWER_DB"].startswith("/data/")
    steps = shell_steps()
    assert ["mkdir", "/data"] in steps
    (chown,) = [s for s in steps if s[0] == "chown"]
    assert chown[-1] == "/data"
    assert chown[1].split(":")[0] in created_user()
    assert env["PYTHONUNBUFFERED"] == "1"
    # See test_compose: SIGTERM must start Celery's soft shutdown, not an unbounded warm one.
    assert env["REMAP_SIGTERM"] == "SIGQUIT"
