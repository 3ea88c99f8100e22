"""Generated sections of Markdown files, and the machine they were measured on.

A generator owns the lines between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` of a file
(e.g. ``docs/results.md``) and rewrites only those, atomically, so hand-written text around them
and other generators' sections are never touched.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch


class SectionError(Exception):
    """A failure to report in one line, with the exit status it deserves."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def markers(name: str) -> tuple[str, str]:
    """The start and end marker lines of section ``name``."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def marker_lines(text: str, path: Path, name: str) -> tuple[int, int]:
    """Indices of the start and end marker lines of section ``name`` in ``text``; refuses
    (exit status 2) without exactly one of each, in order."""
    start_marker, end_marker = markers(name)
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == start_marker]
    ends = [i for i, line in enumerate(lines) if line.strip() == end_marker]
    if len(starts) != 1 or len(ends) != 1 or starts[0] > ends[0]:
        raise SectionError(
            f"{path} lacks one {start_marker} line followed by one {end_marker} line, between "
            f"which the section is written. Fix: add those two lines where the section belongs, "
            f"or give another --out",
            status=2,
        )
    return starts[0], ends[0]


def check_out(path: Path, name: str) -> None:
    """Refuse (exit status 2) an existing output file without the section's markers, before any
    work is done."""
    if path.exists():
        marker_lines(path.read_text(), path, name)


def write_section(path: Path, name: str, section: str) -> None:
    """Put ``section`` between the markers of ``path`` (a new file holds only the markers and
    the section), atomically: a temporary file beside it, then ``os.replace``."""
    if path.exists():
        text = path.read_text()
        start, end = marker_lines(text, path, name)
        lines = text.splitlines(keepends=True)
        new = "".join([*lines[: start + 1], section, "\n", *lines[end:]])
    else:
        start_marker, end_marker = markers(name)
        new = f"{start_marker}\n{section}\n{end_marker}\n"
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", delete=False
    ) as tmp:
        tmp.write(new)
    if path.exists():
        shutil.copymode(path, tmp.name)
    os.replace(tmp.name, path)


def publish(out: Path | None, name: str, make: Callable[[], str]) -> int:
    """Make section ``name`` (``make`` may raise ``SectionError``), print it and, with ``out``,
    write it between that file's markers, refusing a file without them before any work.
    Returns the exit status: 0, or the error's."""
    try:
        if out is not None:
            check_out(out, name)
        section = make()
        print(section)
        if out is not None:
            write_section(out, name, section)
    except SectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.status
    return 0


def machine() -> str:
    """CPU model, logical CPUs, total memory, torch version and its thread count."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    models = [
        line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line
    ]
    cpu = models[0] if models else platform.processor() or platform.machine()
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").is_file() else ""
    kib = [int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal:")]
    memory = f"{kib[0] / 2**20:.1f} GiB" if kib else "unknown"
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, {memory} memory; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def provenance(heading: str, source: str, command: str) -> list[str]:
    """The first lines of a generated section: its heading, when and from what it was generated
    (``source`` completes "Generated on <time> ..."), the command that reproduces it, the
    machine."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        heading,
        "",
        f"Generated on {when} {source}",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Machine: {machine()}.",
    ]
