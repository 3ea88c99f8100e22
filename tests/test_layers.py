"""The layers import one way (docs/design.md): record < estimators < analysis < experiments.

Every import of every module is checked, including those inside functions, so a lower layer
that reaches up (even lazily) fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("attribution.record", "estimators", "attribution.analysis", "experiments")
PUBLIC = "attribution"  # the lazy public surface: analysis-level


def layer(module: str) -> int | None:
    """The layer of a project module (None for third-party and standard-library modules)."""
    if module == PUBLIC:
        return LAYERS.index("attribution.analysis")
    for i, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return i
    return None


def modules() -> list[tuple[str, Path]]:
    found = []
    for top in ("attribution", "estimators", "experiments"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            if name != PUBLIC:
                found.append((name, path))
    return found


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, absolute or relative."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: use absolute imports"
            out.append((node.lineno, node.module or ""))
    return out


def test_every_module_has_a_layer():
    assert {layer(name) for name, _ in modules()} == set(range(len(LAYERS)))
    assert all(layer(name) is not None for name, _ in modules())


@pytest.mark.parametrize(("name", "path"), modules(), ids=[n for n, _ in modules()])
def test_no_import_runs_up(name, path):
    own = layer(name)
    upward = [
        f"{path.relative_to(ROOT)}:{line} imports {module} ({LAYERS[layer(module)]})"
        for line, module in imported(path)
        if layer(module) is not None and layer(module) > own
    ]
    assert not upward, f"{name} is in layer {LAYERS[own]}, but " + "; ".join(upward)


def test_the_checker_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from attribution.analysis.audit import audit\n")
    assert [layer(m) for _, m in imported(bad)] == [2]
    assert layer("attribution.record.trajectory") == 0 < layer("estimators.e2") == 1


def test_public_surface_loads_lazily():
    import subprocess
    import sys

    code = (
        "import sys, attribution.record.trajectory;"
        "assert 'estimators' not in sys.modules;"
        "assert 'attribution.analysis.audit' not in sys.modules;"
        "from attribution import Trajectory, audit, undo, Behavior, build_estimator;"
        "assert build_estimator('e4:2').label == 'e4:2'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
