"""The usage in the docs runs as written, with one import line from the public surface."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_interventions_usage_runs_and_imports_only_the_public_surface(tmp_path):
    text = (ROOT / "docs" / "interventions.md").read_text()
    code = re.search(r"## Usage\n\n```python\n(.*?)```", text, re.S).group(1)
    imports = [line for line in code.splitlines() if line.startswith(("import ", "from "))]
    assert imports == ["from attribution import ("]
    script = tmp_path / "usage.py"
    script.write_text(code)
    out = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    losses = dict(re.findall(r"^(\w+)\s+test loss (\d+\.\d+)", out, re.M))
    assert set(losses) == {"undo", "skip", "filter", "final"}
    assert float(losses["skip"]) != float(losses["final"])
