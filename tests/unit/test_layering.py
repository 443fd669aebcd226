"""The package layering of docs/ARCHITECTURE.md, kept true: every `moedit` import (module level or inside a
function) goes from a higher layer to a lower one; models/ and moe/ stay single-device code (no
torch.distributed); only cli/ imports cli/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[2] / "src" / "moedit"

# low → high, as the package map of docs/ARCHITECTURE.md numbers them; a package imports only lower layers,
# and inside layer 4 samplers use the objectives and generate.py the samplers
LAYERS = [
    {"utils"},
    {"config"},
    {"moe"},
    {"models", "codecs"},
    {"objectives", "samplers", "generate"},
    {"data"},
    {"diagnostics"},
    {"distributed", "device"},
    {"train", "extract"},
    {"runs"},
    {"eval", "convert"},
    {"zoo", "bench"},
    {"cli"},
]
LAYER = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
SAME_LAYER = {("samplers", "objectives"), ("generate", "samplers")}
# config validates names against the registries they live in (routers, gates, backends, presets, objectives,
# samplers, datasets, codecs), importing them inside functions only, when a config is built: the one kind of upward
# edge, so that no name list is kept twice
ALLOWED_UP = {("config", pkg) for pkg in ("moe", "models", "codecs", "objectives", "samplers", "data")}


def _package(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "moedit" else [node.module]
            found += [(name, node.lineno) for name in names]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
    return found


FILES = sorted(p for p in SRC.rglob("*.py") if _package(p) not in ("__init__",))


def test_every_package_has_a_layer():
    packages = {_package(p) for p in FILES}
    assert packages <= set(LAYER), f"packages without a layer in this test: {sorted(packages - set(LAYER))}"


def _violations(path: Path, pkg: str) -> list[str]:
    wrong = []
    for name, line in _imports(path):
        parts = name.split(".")
        if parts[0] != "moedit" or len(parts) < 2 or parts[1] in ("__version__", pkg):
            continue
        target = parts[1]
        if LAYER[target] >= LAYER[pkg] and (pkg, target) not in ALLOWED_UP | SAME_LAYER:
            wrong.append(f"line {line}: {pkg} (layer {LAYER[pkg]}) imports {name} (layer {LAYER[target]})")
    return wrong


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_go_down_the_layers(path):
    wrong = _violations(path, _package(path))
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", [p for p in FILES if _package(p) in ("models", "moe")], ids=lambda p: str(p.relative_to(SRC)))
def test_models_and_moe_are_single_device_code(path):
    distributed = [f"line {line}: {name}" for name, line in _imports(path) if name.startswith("torch.distributed")]
    assert not distributed, "models/ and moe/ must not use torch.distributed (distributed/ wraps them):\n" + "\n".join(distributed)


def test_the_check_catches_an_upward_import(tmp_path):
    probe = tmp_path / "probe.py"  # what moe/convert.py did before conversion got its own package
    probe.write_text("import torch\n\ndef f():\n    from moedit.models.dit import DiT\n    from moedit.cli import main\n")
    assert _violations(probe, "moe") == ["line 4: moe (layer 2) imports moedit.models.dit (layer 3)",
                                         "line 5: moe (layer 2) imports moedit.cli (layer 12)"]
    assert _violations(probe, "cli") == []
