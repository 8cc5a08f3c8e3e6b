"""The layers of docs/architecture.md, enforced by reading every module's imports (function-level
imports included): entrypoints and bootstrap -> adapters -> steps -> ports -> domain."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A module may import our modules of its own rank or lower, never higher.
RANKS = {
    "workers.errors": 0,
    "workers.logfields": 0,
    "workers.domain": 0,
    "workers.models": 0,
    "workers.ports": 1,
    "workers.steps": 2,
    "workers.adapters": 3,
    "workers.producer": 3,
    "workers.client": 3,
    "workers.bootstrap": 4,
    "workers.entrypoints": 5,
}
# The pure layers import nothing from outside the standard library and our lower layers.
PURE = (
    "workers.errors",
    "workers.logfields",
    "workers.models",
    "workers.domain",
    "workers.ports",
    "workers.steps",
)


def modules(package: str) -> list[str]:
    base = ROOT / package.replace(".", "/")
    found = [base.with_suffix(".py")] if base.with_suffix(".py").exists() else []
    found += sorted(base.rglob("*.py")) if base.is_dir() else []
    names = []
    for path in found:
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imports(module: str) -> set[str]:
    path = ROOT / module.replace(".", "/")
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{alias.name}" for alias in node.names}
    return out


def rank(name: str) -> int | None:
    for prefix, value in RANKS.items():
        if name == prefix or name.startswith(prefix + "."):
            return value
    return None


ALL = [m for package in RANKS for m in modules(package)]


def test_every_module_of_workers_has_a_layer() -> None:
    assert sorted(m for m in modules("workers") if m != "workers" and rank(m) is None) == []


@pytest.mark.parametrize("module", ALL)
def test_imports_only_go_down(module: str) -> None:
    own = rank(module)
    assert own is not None
    upward = sorted(name for name in imports(module) if (r := rank(name)) is not None and r > own)
    assert upward == [], f"{module} imports a higher layer"


@pytest.mark.parametrize("module", [m for p in PURE for m in modules(p)])
def test_the_pure_layers_import_only_the_standard_library_and_lower_layers(module: str) -> None:
    foreign = sorted(
        name
        for name in imports(module)
        if name.split(".")[0] not in sys.stdlib_module_names
        and not name.startswith("workers.")
        and name != "workers"
    )
    assert foreign == [], f"{module} is pure and imports {foreign}"


@pytest.mark.parametrize("module", modules("config"))
def test_config_imports_no_workers_but_the_documented_app_shim(module: str) -> None:
    ours = sorted(name for name in imports(module) if name.split(".")[0] == "workers")
    allowed = {"config.celery_app"}
    assert module in allowed or ours == [], f"{module} imports {ours}"


def test_only_bootstrap_and_entrypoints_read_settings() -> None:
    readers = sorted(
        m for m in ALL if any(n.startswith("config") for n in imports(m)) and (rank(m) or 0) < 4
    )
    assert readers == []
