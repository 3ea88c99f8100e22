"""The benchmark, run as `make bench` runs it but on the smoke pipeline: it writes only between
its markers and refuses a file without them. Speed goals are the benchmark's, not checked here."""

import subprocess
import sys
from pathlib import Path

from experiments.bench import SECTION
from experiments.sections import markers

REPO = Path(__file__).resolve().parents[2]
BEFORE = "# Results\n\nHand-written text above.\n\n"
AFTER = "\nHand-written text below.\n"
START, END = markers(SECTION)


def bench(out: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "experiments.bench", "--quick", "--out", str(out)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_quick_run_fills_only_the_marked_section_and_refuses_a_file_without_markers(tmp_path):
    out = tmp_path / "results.md"
    out.write_text(f"{BEFORE}{START}\nstale section\n{END}\n{AFTER}")
    done = bench(out)
    assert done.returncode == 0, done.stderr

    text = out.read_text()
    assert text.startswith(f"{BEFORE}{START}\n") and text.endswith(f"\n{END}\n{AFTER}")
    section = text[len(BEFORE) + len(START) : -len(END + AFTER) - 1]
    assert "stale section" not in section and section.strip() in done.stdout
    assert f"python -m experiments.bench --quick --out {out}" in section
    assert sum(line.startswith("|---") for line in section.splitlines()) == 7  # seven tables
    mnist, text = section.split("### The toxicity pipeline")
    for method in ["ground truth", "e0", "e1", "e2", "e4:2", "subset:0.25"]:
        assert f"\n| {method} | " in mnist and f"\n| {method} | " in text
    assert "examples/s" in mnist and "vmap(grad)" in mnist
    for readout in ["inference", "linear read-out", "evaluated read-out"]:
        assert f"\n| {readout} | " in text
    assert "`toxicity`, `preset=toxicity_smoke`" in text

    unmarked = tmp_path / "unmarked.md"
    unmarked.write_text(BEFORE + AFTER)
    refused = bench(unmarked)
    assert refused.returncode == 2
    assert str(unmarked) in refused.stderr and "Fix:" in refused.stderr
    assert unmarked.read_text() == BEFORE + AFTER
