"""The audit's report opened in a real headless Chromium, as a reader opens it: the page loads
without a console error, its tables are in the DOM, every image decodes (the report's inline
script marks ``<body data-images-ok>`` after the load event) and it renders to a screenshot.
The network is cut (every host name fails to resolve), so a reference to anything outside the
file would show up as a broken image.

Without Chromium the test is skipped locally (install it: ``apt-get install chromium``) and
fails under CI (``CI=true``), where ``.ci/run`` installs it. ``docs/report.md`` says more.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from attribution.analysis.report import REPORT, examples_of, write_report
from tests.attribution.test_report import Parsed, audited, behaviours  # noqa: F401 (fixture)

TABLES = ("effects-table", "method-table", "evidence-table", "estimators-table", "validation-table")
CONSOLE = (":CONSOLE", "Uncaught")
"""What Chromium's log (``--enable-logging=stderr``) writes for a console message or error."""


def chromium() -> str:
    """The Chromium executable; skipped when missing, a failure under CI."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    message = (
        "chromium is not installed, so the report cannot be checked in a browser: install it "
        "with `apt-get install chromium` (Debian/Ubuntu) and run this test again"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def open_in_browser(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Chromium, headless, offline and in a private profile, on ``page``."""
    return subprocess.run(
        [
            chromium(),
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--enable-logging=stderr",
            "--v=0",
            *args,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def console(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(mark in line for mark in CONSOLE)]


def body(dom: str) -> dict[str, str]:
    (found,) = [attrs for tag, attrs in Parsed(dom).tags if tag == "body"]
    return found


@pytest.fixture(scope="module")
def report(audited, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    chromium()  # skipped (or failed under CI) before any work
    traj, result, checked = audited
    folder = tmp_path_factory.mktemp("browser")
    return write_report(folder, result, traj, checked, examples=examples_of(behaviours()))


def test_the_report_loads_in_chromium_with_its_tables_and_images(report, tmp_path):
    done = open_in_browser(report, tmp_path / "profile", "--dump-dom")
    assert not console(done.stderr), console(done.stderr)
    dom = Parsed(done.stdout)
    ids = {attrs.get("id") for _, attrs in dom.tags}
    assert set(TABLES) <= ids
    images = [attrs for tag, attrs in dom.tags if tag == "img"]
    assert len(images) == report.read_text().count("<img ") > 5
    assert body(done.stdout)["data-images-broken"] == "0"
    assert body(done.stdout)["data-images-ok"] == "true"


def test_a_broken_image_and_a_script_error_are_caught(report, tmp_path):
    """The checks above can fail: a copy with a damaged image and a failing script."""
    damaged = tmp_path / REPORT
    png = "data:image/png;base64,"
    text = report.read_text().replace(f"{png}iVBOR", f"{png}AAAA", 1)  # one PNG's signature
    damaged.write_text(text.replace("</body>", "<script>notDefined();</script></body>"))
    done = open_in_browser(damaged, tmp_path / "profile", "--dump-dom")
    assert body(done.stdout)["data-images-ok"] == "false"
    assert body(done.stdout)["data-images-broken"] == "1"
    assert any("notDefined" in line for line in console(done.stderr)), done.stderr[-2000:]


def test_the_report_renders_to_a_screenshot(report, tmp_path):
    shot = tmp_path / "report.png"
    done = open_in_browser(
        report, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,2400"
    )
    assert not console(done.stderr), console(done.stderr)
    image = Image.open(shot).convert("L")
    assert image.size == (1200, 2400)
    low, high = image.getextrema()
    assert low < 60 and high > 240  # dark text on a light page, not a blank frame
    top = image.crop((0, 0, 1200, 300))
    assert top.getextrema()[0] < 60  # the title is drawn at the top
