"""The audit's HTML report (``attribution.analysis.report``): its numbers are the audit's, read
back from the HTML; every label and its evidence are shown; every image is a PNG that decodes;
nothing is fetched from outside the file; hostile names are escaped; bad input writes nothing.

Sign convention: effect_k(f) = f(theta_T) - f(theta_T^(-k)).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from attribution.analysis.audit import Audit, audit
from attribution.analysis.behaviors import Behavior
from attribution.analysis.choice import LABELS, Label
from attribution.analysis.report import REPORT, examples_of, write_report
from attribution.analysis.validate import validate
from attribution.record.errors import StagetraceError
from attribution.record.references import Ref
from attribution.record.trajectory import Trajectory
from estimators import EVIDENCE
from estimators.registry import available_evidence
from tests.helpers import check_cli_error, cli

TEST_SET = Ref("experiments.data:mnist", {"split": "test", "stop": 120})
GROUPS = {"low": (0, 1, 2, 3, 4), "high": (5, 6, 7, 8, 9)}
HOSTILE = "<script>alert('x')</script>&\"$\\frac$"
"""A name that is markup, an attribute breaker and matplotlib mathtext at once."""


def behaviours() -> dict[str, Behavior]:
    return {
        "test_loss": Behavior("test_loss", TEST_SET),
        "test_margin": Behavior("test_margin", TEST_SET, quantity="margin"),
        "groups": Behavior("groups", TEST_SET, aggregate="group_mean", groups=GROUPS),
        "gap": Behavior("gap", TEST_SET, aggregate="group_gap", groups=GROUPS, gap=("low", "high")),
    }


class Parsed(HTMLParser):
    """Every start tag with its attributes; an element with a ``data-value`` also gets the text
    a reader sees in it, under ``"#text"``."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self._inside: dict[str, str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        if "data-value" in self.tags[-1][1]:
            self._inside = self.tags[-1][1]
            self._inside["#text"] = ""

    def handle_data(self, data: str) -> None:
        if self._inside is not None:
            self._inside["#text"] += data

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "div"):
            self._inside = None

    def with_attr(self, name: str, tag: str | None = None) -> list[dict[str, str]]:
        return [a for t, a in self.tags if name in a and (tag is None or t == tag)]


@pytest.fixture(scope="module")
def audited(recorded_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """E1's audit of the tiny run (a private copy: embeddings are stored under it), and the
    validation of E0 and E1 against retraining with per-example effects kept."""
    run = Path(shutil.copytree(recorded_run, tmp_path_factory.mktemp("report") / "run"))
    traj = Trajectory.open(run)
    result = audit(traj, "e1", behaviours())
    checked = validate(traj, ["e0", "e1"], ["evaluated"], behaviours(), keep_effects=True)
    return traj, result, checked


def report_of(folder: Path, result: Audit | dict, traj: Trajectory, **kwargs: Any) -> str:
    path = write_report(folder, result, traj, **kwargs)
    assert path == folder / REPORT
    return path.read_text()


def images(text: str) -> list[Image.Image]:
    """Every <img> of the report, decoded (``verify`` raises on a damaged PNG)."""
    decoded = []
    for attrs in Parsed(text).with_attr("src", "img"):
        prefix = "data:image/png;base64,"
        assert attrs["src"].startswith(prefix), attrs["src"][:80]
        data = base64.b64decode(attrs["src"][len(prefix) :], validate=True)
        Image.open(io.BytesIO(data)).verify()
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and image.width > 0 and image.height > 0
        decoded.append(image)
    return decoded


def test_the_table_holds_the_audits_mean_effects_and_every_label(audited, tmp_path):
    traj, result, _ = audited
    text = report_of(tmp_path, result, traj)
    page = Parsed(text)
    cells = {}
    for tag, attrs in page.tags:
        if tag == "td" and "effect" in attrs.get("class", "").split():
            cells[attrs["data-stage"], attrs["data-behavior"]] = attrs
    assert set(cells) == {(s, b) for s in result.stages for b in result.behaviors}
    for (stage, name), attrs in cells.items():
        expected = result.behaviors[name].mean_effect[stage]
        assert float(attrs["data-value"]) == expected  # the exact number, not a rounding
        assert attrs["#text"] == format(expected, "+.4g")  # what a reader sees
    # the group behaviours' outputs, per stage
    for tag, attrs in page.tags:
        if tag == "td" and "data-output" in attrs:
            behaviour = result.behaviors[attrs["data-behavior"]]
            effect = behaviour.of(attrs["data-stage"])[
                f"{attrs['data-behavior']}[{attrs['data-output']}]"
            ]
            assert float(attrs["data-value"]) == effect
    # E1: the last stage exact, the others unreliable, each with its evidence
    assert [result.labels[s].label for s in result.stages] == ["unreliable"] * 2 + ["exact"]
    for label in result.labels.values():
        assert f'class="label label-{label.label}">{label.label}</span>' in text
        assert html.escape(label.evidence) in text
    assert html.escape(result.sign_convention) in text


def test_every_label_is_shown_with_its_evidence_and_agreement(audited, tmp_path):
    traj, result, _ = audited
    stages = result.stages
    labels = {
        stages[0]: Label("reliable", "replays agree", 0.93),
        stages[1]: Label("uncertain", "replays half agree", 0.7),
        stages[2]: Label("exact", "the last stage"),
    }
    text = report_of(tmp_path, dataclasses.replace(result, labels=labels), traj)
    for label in labels.values():
        assert f'class="label label-{label.label}">{label.label}</span>' in text
        assert label.evidence in text
    assert "agreement 0.930" in text and "agreement 0.700" in text
    data = result.to_json()
    data["labels"][stages[0]] = {"label": "unreliable", "evidence": "no replay", "agreement": None}
    assert 'label-unreliable">unreliable' in report_of(tmp_path, data, traj)
    assert set(LABELS) == {"exact", "reliable", "uncertain", "unreliable"}


def test_images_are_inline_pngs_and_nothing_is_fetched(audited, tmp_path):
    traj, result, checked = audited
    text = report_of(tmp_path, result, traj, validation=checked, examples=examples_of(behaviours()))
    decoded = images(text)
    # 2 group bar charts, 2 histograms, the schedule, 2 scatter figures and thumbnails
    figures = [im for im in decoded if im.width > 200]
    thumbnails = [im for im in decoded if im.size == (28, 28)]
    assert len(figures) == 2 + 2 + 1 + 1 + 2 and len(thumbnails) > 0
    assert len(figures) + len(thumbnails) == len(decoded)
    outside = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text).lower()
    assert "http" not in outside and "//" not in outside and "ftp:" not in outside
    assert "<link" not in outside and "@import" not in outside and "url(" not in outside
    for attrs in Parsed(text).with_attr("src"):
        assert attrs["src"].startswith("data:image/png;base64,")
    for attrs in Parsed(text).with_attr("href"):
        assert attrs["href"].startswith("#")
    assert text.count("<script>") == 1  # the one inline script that marks decoded images


def test_examples_are_the_ones_each_stage_helped_and_hurt_most(audited, tmp_path):
    traj, result, _ = audited
    top = 3
    page = Parsed(report_of(tmp_path, result, traj, examples=examples_of(behaviours()), top=top))
    shown = page.with_attr("data-kind", "div")
    for name, worse_up in (("test_loss", True), ("test_margin", False)):
        effects = result.behaviors[name]
        table = _examples_table(page, name)
        assert len(table) == sum(a in shown for a in table) > 0
        for stage in result.stages:
            values = effects.effects[stage]
            indexed = list(enumerate(values))
            rising = [i for i, v in sorted(indexed, key=lambda p: -p[1]) if v > 0][:top]
            falling = [i for i, v in sorted(indexed, key=lambda p: p[1]) if v < 0][:top]
            helped, hurt = (falling, rising) if worse_up else (rising, falling)
            for kind, expected in (("helped", helped), ("hurt", hurt)):
                got = [
                    (int(a["data-index"]), float(a["data-value"]))
                    for a in table
                    if a["data-stage"] == stage and a["data-kind"] == kind
                ]
                assert got == [(i, values[i]) for i in expected], (name, stage, kind)


def _examples_table(page: Parsed, behaviour: str) -> list[dict[str, str]]:
    """The example entries of one behaviour's table (entries follow their table's start)."""
    out, inside = [], False
    for tag, attrs in page.tags:
        if tag == "table":
            inside = attrs.get("data-behavior") == behaviour and "examples" in attrs.get(
                "class", ""
            )
        elif inside and tag == "div" and "data-kind" in attrs:
            out.append(attrs)
    return out


def test_hostile_names_are_escaped(audited, tmp_path):
    traj, result, _ = audited
    data = json.loads(json.dumps(result.to_json()))
    renamed = {data["stages"][0]: HOSTILE}
    data["stages"] = [renamed.get(s, s) for s in data["stages"]]
    data["labels"] = {renamed.get(s, s): v for s, v in data["labels"].items()}
    data["labels"][HOSTILE]["evidence"] = HOSTILE
    for behaviour in data["behaviors"].values():
        for key in ("effects", "mean_effect"):
            behaviour[key] = {renamed.get(s, s): v for s, v in behaviour[key].items()}
    data["behaviors"][HOSTILE] = data["behaviors"].pop("groups")
    data["behaviors"][HOSTILE]["outputs"] = [f"{HOSTILE}[{HOSTILE}]", f"{HOSTILE}[high]"]
    data["estimator"]["label"] = HOSTILE
    data["evidence"] = [{"check": HOSTILE, "passed": False}]
    text = report_of(tmp_path, data, traj, evidence=[{HOSTILE: 1.5}])
    assert "<script>alert" not in text and "</script>&" not in text
    assert text.count("<script>") == 1 and text.count("</script>") == 1
    assert html.escape(HOSTILE) in text
    page = Parsed(text)
    assert {a["data-stage"] for a in page.with_attr("data-stage")} >= {HOSTILE}
    assert HOSTILE in {a["data-behavior"] for a in page.with_attr("data-behavior")}
    images(text)  # the dollar signs did not break the figures


def test_the_audits_evidence_and_unknown_fields_are_shown(audited, tmp_path):
    traj, result, _ = audited
    data = result.to_json()
    data["evidence"] = [{"check": "loss recomputed at every checkpoint", "passed": True}]
    data["checkpoints"] = {"found": 7, "verified": "all"}
    text = report_of(tmp_path, data, traj, evidence=[{"check": "a caller's row", "passed": 0.5}])
    assert "loss recomputed at every checkpoint" in text and "a caller&#x27;s row" in text
    assert '<section id="more">' in text and "checkpoints" in text and ">7<" in text
    held = available_evidence(traj)
    rows = {a["data-evidence"] for a in Parsed(text).with_attr("data-evidence")}
    assert rows == set(EVIDENCE)
    for key in EVIDENCE:
        row = text.split(f'data-evidence="{key}"')[1].split("</tr>")[0]
        assert ('class="yes"' in row) == (key in held)
    steps = sum(r.num_steps for r in traj.stages)
    assert f"{steps} steps in all" in text


def test_a_validation_beside_the_audit_adds_its_scatter_plots(audited, tmp_path):
    traj, result, checked = audited
    assert '<section id="validation">' not in report_of(tmp_path, result, traj)
    (tmp_path / "validation.json").write_text(json.dumps(checked.to_json()))
    text = report_of(tmp_path, result, traj)
    assert '<section id="validation">' in text and str(tmp_path / "validation.json") in text
    section = text.split('<section id="validation">')[1]
    assert len(images(section)) == 1  # one panel per estimator; per example needs the object
    table = Parsed(section).with_attr("data-value")
    assert not table  # no effect cells in this section
    for row in checked.rows:
        assert f"<td>{row.estimator}</td><td>{row.readout}</td>" in section
    with_effects = report_of(tmp_path, result, traj, validation=checked)
    assert len(images(with_effects.split('<section id="validation">')[1])) == 1 + 2
    (tmp_path / "validation.json").write_text("{not json")
    damaged = report_of(tmp_path, result, traj)
    assert "which is not a validation result" in damaged


def test_a_report_path_that_is_a_directory_is_refused_and_nothing_written(audited, tmp_path):
    traj, result, _ = audited
    (tmp_path / REPORT).mkdir()
    with pytest.raises(StagetraceError, match=r"report\.html is a directory.*Fix:"):
        write_report(tmp_path, result, traj)
    assert [p.name for p in tmp_path.iterdir()] == [REPORT]


def test_stagetrace_audit_writes_the_report_beside_its_result(run_copy, tmp_path, capsys):
    behaviours_file = tmp_path / "behaviours.yaml"
    behaviours_file.write_text(
        f"test_loss: {{data: {json.dumps(TEST_SET.to_dict())}, quantity: loss}}\n"
    )
    out = tmp_path / "out" / "attribution.json"
    code, printed, err = cli(
        capsys, "audit", run_copy, "--estimator", "e0", "--behaviors", behaviours_file,
        "--out", out,
    )  # fmt: skip
    assert code == 0, err
    assert printed.splitlines()[-2:] == [f"report: {out.parent / REPORT}", f"-> {out}"]
    saved = json.loads(out.read_text())
    page = Parsed((out.parent / REPORT).read_text())
    values = {
        a["data-stage"]: float(a["data-value"]) for a in page.with_attr("data-behavior", "td")
    }
    assert values == saved["behaviors"]["test_loss"]["mean_effect"]
    # a report path that cannot be written is refused before any work: nothing written
    refused = tmp_path / "refused"
    (refused / REPORT).mkdir(parents=True)
    code, _, err = cli(
        capsys, "audit", run_copy, "--estimator", "e0", "--behaviors", behaviours_file,
        "--out", refused / "attribution.json",
    )  # fmt: skip
    assert code == 2
    check_cli_error(err, "report.html")
    assert [p.name for p in refused.iterdir()] == [REPORT]


def test_a_stage_without_numbers_is_shown_as_such(audited, tmp_path):
    """An audit of checkpoints whose start nobody kept has no number for that stage
    (``stagetrace audit SPEC.yaml``, docs/audit.md): the report says so and draws the rest."""
    traj, result, _ = audited
    data = json.loads(json.dumps(result.to_json()))
    gone = data["stages"][0]
    for behaviour in data["behaviors"].values():
        behaviour["effects"][gone] = None
        behaviour["mean_effect"][gone] = None
    data["labels"][gone] = {"label": "unknown start", "evidence": "no start kept"}
    text = report_of(tmp_path, data, traj, examples=examples_of(behaviours()))
    cells = [a for a in Parsed(text).with_attr("data-stage", "td") if "effect" in a["class"]]
    missing = [a for a in cells if a["data-stage"] == gone]
    assert len(missing) == len(data["behaviors"])
    assert all(a["#text"] == "no number" and a["data-value"] == "nan" for a in missing)
    assert 'class="label label-unknown-start">unknown start</span>' in text
    examples = [a for a in Parsed(text).with_attr("data-kind", "div") if a["data-stage"] == gone]
    assert not examples
    images(text)
