"""The audit's report: one self-contained ``report.html`` that people read in a browser.

``write_report(folder, audit, traj)`` writes ``folder/report.html`` beside ``attribution.json``
(atomically). The page needs nothing but itself: no network, no external style sheet, script
or font; every figure is a PNG drawn with matplotlib's Agg canvas and inlined as base64. It
shows, in order (``docs/report.md``):

- the sign convention, effect_k(f) = f(theta_T) - f(theta_T^(-k)), and how to read it;
- the stage x behaviour table of mean effects, each stage with its reliability label and the
  evidence behind it, and the method: what ``auto`` chose and why, what would make it better;
- bar charts of every stage's effect on each output of the group behaviours;
- for the per-example behaviours, the test examples each stage helped and hurt most (an
  ``Audit`` holds per-example effects already: a per-example behaviour's outputs are its
  examples, ``"<name>[i]"``; group behaviours keep only their aggregates, so the report draws
  examples from the per-example behaviours alone), with their images when ``examples`` gives
  the inputs, and a histogram of the per-example effects;
- the learning rate of every step over the global step, with the stage boundaries;
- the evidence the recording holds, which estimators it allows (``available_evidence``,
  ``check_evidence``), whether it can be replayed, and any ``evidence`` rows the audit carries;
- when a validation ran (a ``Validation``, or ``validation.json`` found in ``folder``), its
  table and estimate-against-truth scatter plots.

Fields of ``audit.to_json()`` that this module does not know are shown as generic tables, so a
richer audit result is reported without a change here. All text is escaped (``html.escape``).
A tiny inline script sets ``data-images-ok`` on ``<body>`` once the page has loaded (``true``
when every image decoded), which the browser test reads.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from attribution.analysis.audit import Audit
from attribution.analysis.behaviors import Behavior
from attribution.analysis.choice import replay_problem
from attribution.analysis.validate import Validation
from attribution.record import SIGN_CONVENTION
from attribution.record.errors import StagetraceError
from attribution.record.store import DiskStore
from attribution.record.trajectory import Trajectory
from estimators import ESTIMATORS, EVIDENCE, build, check_evidence
from estimators.registry import available_evidence

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT = "report.html"
VALIDATION = "validation.json"
TOP = 5
"""Examples shown per stage and direction (helped most, hurt most)."""
UNITS = {"loss": "nats", "margin": "logits"}
HIGHER_IS_WORSE = {"loss": True, "margin": False}
"""Whether a rise of the quantity is harm (a loss) or help (a margin)."""
KNOWN = {
    "trajectory",
    "estimator",
    "readout",
    "readout_seconds",
    "stages",
    "behaviors",
    "labels",
    "check_seconds",
    "plan",
    "sign_convention",
    "evidence",
}
"""Fields of ``Audit.to_json()`` with a section of their own; any other is shown generically."""

STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1100px;padding:1em 1.5em 3em;color:#1b1b1b;background:#fff}
h1{margin:.2em 0 .1em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h3{margin:1.2em 0 .4em}.meta{color:#555}.sign{background:#f3f6fb;border-left:4px solid #4a78c2;
padding:.6em 1em;font-family:ui-monospace,Menlo,Consolas,monospace}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:14px}
th,td{border:1px solid #d6d6d6;padding:.3em .55em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-family:ui-monospace,Menlo,Consolas,monospace;
white-space:nowrap}.evidence-text{max-width:34em;color:#333}
.label{display:inline-block;padding:.05em .5em;border-radius:.8em;font-weight:600;font-size:13px;
background:#e5e5e5;color:#333}
.label-exact{background:#d5f0da;color:#14532d}.label-reliable{background:#dbeafe;color:#1e3a8a}
.label-uncertain{background:#fef3c7;color:#78350f}.label-unreliable{background:#fde2e1;
color:#7f1d1d}.yes{color:#14532d;font-weight:600}.no{color:#7f1d1d;font-weight:600}
figure{margin:.6em 0 1.2em}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:13px}nav a{margin-right:.9em}
.ex{display:flex;align-items:center;gap:.5em;margin:.1em 0}.ex img{width:42px;height:42px;
image-rendering:pixelated;border:1px solid #ccc}.note{color:#7a5b00;background:#fff8e1;
padding:.4em .8em;border-left:4px solid #e0b100}code{font-size:13px}
"""

SCRIPT = """
window.addEventListener("load", function () {
  var images = document.images, broken = 0;
  for (var i = 0; i < images.length; i++) {
    if (!(images[i].complete && images[i].naturalWidth > 0)) { broken++; }
  }
  document.body.setAttribute("data-images-broken", String(broken));
  document.body.setAttribute("data-images-ok", broken ? "false" : "true");
});
"""
"""Marks ``<body>`` with whether every image decoded (read by the browser test)."""

Examples = Mapping[str, Sequence[Any]]
"""Per per-example behaviour: its test inputs [N, ...] and, optionally, labels [N]
(``Behavior.load()[:2]``)."""


def report_path(folder: Path | str) -> Path:
    """Where the report of an audit written in ``folder`` goes."""
    return Path(folder) / REPORT


def check_report(folder: Path | str) -> Path:
    """Refuse, before any work, a report path that cannot be a file; returns the path. (That
    its folder is writable is ``attribution.record.artifacts.check_writable``'s to say.)"""
    path = report_path(folder)
    if path.is_dir():
        raise StagetraceError(
            f"{path} is a directory, so the audit's report cannot be written there. Fix: "
            "remove or rename it, or write the audit elsewhere (--out FILE)"
        )
    return path


def examples_of(behaviors: Mapping[str, Behavior]) -> dict[str, tuple[Any, Any]]:
    """The inputs and labels of every per-example behaviour (``Behavior.load``, cached), for
    ``write_report``'s ``examples``."""
    return {n: b.load()[:2] for n, b in behaviors.items() if b.aggregate == "per_example"}


def write_report(
    folder: Path | str,
    audit: Audit | Mapping[str, Any],
    traj: Trajectory,
    validation: Validation | Mapping[str, Any] | None = None,
    examples: Examples | None = None,
    evidence: Sequence[Mapping[str, Any]] = (),
    top: int = TOP,
) -> Path:
    """Write ``folder/report.html`` atomically and return its path.

    ``audit``: an ``Audit`` or its ``to_json()`` (e.g. ``attribution.json`` read back);
    ``traj``: the audited trajectory (learning rates, evidence); ``validation``: a
    ``Validation`` or its ``to_json()``; when None, ``folder/validation.json`` is used if
    present; ``examples``: per per-example behaviour, its inputs (and labels), to show the
    examples as images; ``evidence``: extra evidence rows (mappings) shown beside any the audit
    carries; ``top``: examples per stage and direction.
    """
    path = check_report(folder)
    text = _render(audit, traj, _validation(validation, Path(folder)), examples, evidence, top)
    DiskStore(path.parent).put(path.name, text.encode())
    return path


def _render(
    audit: Audit | Mapping[str, Any],
    traj: Trajectory,
    validation: tuple[Mapping[str, Any], Validation | None, str] | None = None,
    examples: Examples | None = None,
    evidence: Sequence[Mapping[str, Any]] = (),
    top: int = TOP,
) -> str:
    """The report's HTML text. ``validation``: its JSON, the object when there is one (its
    per-example effects give per-example scatter plots) and where it came from."""
    data = dict(audit) if isinstance(audit, Mapping) else audit.to_json()
    stages = [str(s) for s in data["stages"]]
    behaviors = data["behaviors"]
    estimator = data["estimator"]
    title = f"stagetrace audit of {data['trajectory']}"
    sections = [
        ("sign", "Sign convention", _sign(data, behaviors)),
        ("effects", "Mean effect of each stage", _effects(data, stages, behaviors)),
        ("method", "Method", _method(data)),
        ("groups", "Group behaviours", _groups(stages, behaviors)),
        (
            "examples",
            "Examples each stage helped and hurt most",
            _examples(stages, behaviors, examples, top),
        ),
        ("schedule", "Learning rate over the training", _schedule(traj)),
        ("evidence", "Evidence in the recording", _evidence(traj, data, evidence)),
    ]
    if validation is not None:
        sections.append(("validation", "Validation against retraining", _validated(validation)))
    extra = {k: v for k, v in data.items() if k not in KNOWN}
    if extra:
        sections.append(("more", "More from the audit", _more(extra)))
    nav = " ".join(f'<a href="#{key}">{_e(name)}</a>' for key, name, _ in sections)
    body = "\n".join(
        f'<section id="{key}">\n<h2>{_e(name)}</h2>\n{content}\n</section>'
        for key, name, content in sections
    )
    return (
        "<!doctype html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{STYLE}</style>\n</head>\n"
        '<body data-images-ok="pending">\n'
        "<h1>Which stage is accountable</h1>\n"
        f'<p class="meta">Run <code>{_e(data["trajectory"])}</code>; stages '
        f"{_e(', '.join(stages))}; estimator <b>{_e(estimator['label'])}</b> with the "
        f"<b>{_e(data['readout'])}</b> read-out.</p>\n"
        f"<nav>{nav}</nav>\n{body}\n<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )


# --- sections -------------------------------------------------------------------------------


def _sign(data: Mapping[str, Any], behaviors: Mapping[str, Any]) -> str:
    quantities = sorted({str(b["quantity"]) for b in behaviors.values()})
    meaning = {
        "loss": "for a loss (nats), an effect &gt; 0 means the stage <b>raised</b> it (blame), "
        "&lt; 0 that it lowered it (credit)",
        "margin": "for a margin (true-class logit minus the largest other, in logits), an "
        "effect &gt; 0 means the stage <b>raised</b> it (it helped), &lt; 0 that it lowered it",
    }
    items = "".join(f"<li>{meaning[q]};</li>" for q in quantities if q in meaning)
    return (
        f'<p class="sign">{_e(data.get("sign_convention", SIGN_CONVENTION))}</p>\n'
        "<p>The effect of a stage is the final model's value minus the value of the model "
        "retrained with that stage skipped (the later stages run as recorded).</p>\n"
        f"<ul>{items}<li>table cells are tinted <span style='background:{_tint(1, True)}'>"
        "red</span> where the stage made the behaviour worse and <span style='background:"
        f"{_tint(1, False)}'>green</span> where it made it better, darker for larger effects "
        "(a gap between groups is left untinted: whether a wider gap is worse is yours to "
        "say).</li></ul>"
    )


def _effects(data: Mapping[str, Any], stages: list[str], behaviors: Mapping[str, Any]) -> str:
    labels = data["labels"]
    head = "".join(
        f'<th data-behavior="{_e(name)}">{_e(name)}<br><small>{_e(_describe(b))}</small></th>'
        for name, b in behaviors.items()
    )
    largest = {
        name: max(
            (abs(v) for v in _floats([b["mean_effect"][s] for s in stages]) if math.isfinite(v)),
            default=0.0,
        )
        for name, b in behaviors.items()
    }
    rows = []
    for stage in stages:
        cells = []
        for name, b in behaviors.items():
            given = b["mean_effect"][stage]
            value = _float(given)
            worse = _worse(value, b)
            share = abs(value) / largest[name] if largest[name] > 0 else 0.0
            style = f' style="background:{_tint(share, worse)}"' if worse is not None else ""
            cells.append(
                f'<td class="num effect" data-stage="{_e(stage)}" data-behavior="{_e(name)}" '
                f'data-value="{value!r}" title="{value!r}"{style}>{_num(given)}</td>'
            )
        label = labels.get(stage, {})
        agreement = label.get("agreement")
        agreed = f"<br><small>agreement {_num(agreement, '.3f')}</small>" if agreement else ""
        rows.append(
            f'<tr><th data-stage="{_e(stage)}">{_e(stage)}</th>{"".join(cells)}'
            f"<td>{_label(label.get('label', '?'))}{agreed}</td>"
            f'<td class="evidence-text">{_e(label.get("evidence", ""))}</td></tr>'
        )
    return (
        "<p>Mean over each behaviour's outputs of the stage's effect (per example, per group, "
        "or the gap), with how far each stage's estimate can be trusted.</p>\n"
        f'<table id="effects-table"><thead><tr><th>stage</th>{head}<th>trust</th>'
        f"<th>evidence for the label</th></tr></thead>\n<tbody>{''.join(rows)}</tbody></table>\n"
        "<p><small>Labels: <b>exact</b> the truth, or the last stage read out exactly; "
        "<b>reliable</b> / <b>uncertain</b> / <b>unreliable</b> from how well a subset replay's "
        "independent replicas agree per example, or <b>unreliable</b> for an "
        "estimator that does not replay the later stages on a stage before the last "
        "(docs/design.md, section 5b).</small></p>"
    )


def _method(data: Mapping[str, Any]) -> str:
    est = data["estimator"]
    settings = ", ".join(f"{k}={v}" for k, v in dict(est.get("settings") or {}).items())
    counts = ", ".join(f"{k}: {v}" for k, v in dict(est.get("counts") or {}).items())
    reused = {True: "reused from storage", False: "computed now", None: "given by the caller"}
    rows = [
        ("estimator", f"{est['label']} ({est['name']})"),
        ("settings", settings or "defaults"),
        ("embeddings", f"{_num(est['seconds'], '.2f')} s, {reused.get(est.get('reused'))}"),
        ("work", counts or "none recorded"),
        ("read-out", f"{data['readout']}, {_num(data['readout_seconds'], '.2f')} s"),
        ("label check", f"{_num(data['check_seconds'], '.2f')} s"),
    ]
    plan = data.get("plan")
    if plan:
        predicted = ", ".join(
            f"{k}: {_num(v, '.1f')} s" for k, v in dict(plan["predicted_seconds"]).items()
        )
        rows = [
            ("chosen", f"{plan['estimator']} (--estimator auto)"),
            ("why", plan["reason"]),
            ("predicted cost", predicted or "not predicted (no replay possible)"),
            ("budget", f"{_num(plan['budget'], 'g')} s"),
            ("a better answer", plan["better"]),
            *rows,
        ]
    elif est["name"] == "truth":
        rows.insert(0, ("chosen", "the truth, by the caller: retraining without each stage"))
    else:
        rows.insert(
            0,
            (
                "chosen",
                "by the caller (not --estimator auto): no plan weighed the truth's cost; "
                "validate the estimator against retraining on a run like this one "
                "(stagetrace validate) before trusting a stage labelled unreliable",
            ),
        )
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table id="method-table">{body}</table>'


def _groups(stages: list[str], behaviors: Mapping[str, Any]) -> str:
    grouped = {n: b for n, b in behaviors.items() if b["aggregate"] != "per_example"}
    if not grouped:
        return "<p>No group behaviour (group_mean or group_gap) was audited.</p>"
    parts = []
    for name, b in grouped.items():
        outputs = [_inner(name, o) for o in b["outputs"]]
        head = "".join(f"<th>{_e(o)}</th>" for o in outputs)
        rows = "".join(
            f"<tr><th>{_e(s)}</th>"
            + "".join(
                f'<td class="num" data-stage="{_e(s)}" data-behavior="{_e(name)}" '
                f'data-output="{_e(o)}" data-value="{_float(v)!r}">{_num(_float(v))}</td>'
                for o, v in zip(outputs, _floats(b["effects"][s], len(outputs)), strict=True)
            )
            + "</tr>"
            for s in stages
        )
        figure = _new_figure((min(14.0, max(4.5, 0.6 * len(outputs) * len(stages))), 3.2))
        ax = figure.subplots()
        width = 0.8 / max(1, len(stages))
        x = np.arange(len(outputs))
        for i, stage in enumerate(stages):
            values = _floats(b["effects"][stage], len(outputs))
            ax.bar(x + (i - (len(stages) - 1) / 2) * width, values, width, label=_t(stage))
        ax.axhline(0, color="#444", lw=0.8)
        ax.set_xticks(x, [_t(o) for o in outputs], rotation=20 if len(outputs) > 3 else 0)
        ax.set_ylabel(f"effect ({UNITS.get(b['quantity'], b['quantity'])})")
        ax.set_title(_t(f"{name}: {_describe(b)}"), fontsize=10)
        ax.legend(title="stage", fontsize=8, title_fontsize=8)
        caption = (
            f"Effect of each stage on each output of {name} (> 0: the stage raised "
            f"the {b['quantity']})."
        )
        parts.append(
            f"<h3>{_e(name)}</h3>\n{_figure(figure, f'effects on {name}', caption)}\n"
            f"<table><tr><th>stage</th>{head}</tr>{rows}</table>"
        )
    return "\n".join(parts)


def _examples(
    stages: list[str], behaviors: Mapping[str, Any], examples: Examples | None, top: int
) -> str:
    per_example = {n: b for n, b in behaviors.items() if b["aggregate"] == "per_example"}
    if not per_example:
        return (
            "<p>No per-example behaviour was audited, so no example can be named: declare one "
            "(<code>aggregate: per_example</code>, the default) to see them.</p>"
        )
    parts = [
        f"<p>Per stage, the {top} examples whose loss or margin the stage changed most for the "
        "better (helped) and for the worse (hurt), by their effect; # is the example's index in "
        "the behaviour's data.</p>"
    ]
    for name, b in per_example.items():
        worse_up = HIGHER_IS_WORSE.get(b["quantity"], True)
        inputs, labels = _inputs(examples, name)
        rows = []
        for stage in stages:
            values = np.array(_floats(b["effects"][stage], len(b["outputs"])))
            low = [int(i) for i in np.argsort(values, kind="stable")[:top] if values[i] < 0]
            high = [int(i) for i in np.argsort(-values, kind="stable")[:top] if values[i] > 0]
            helped, hurt = (low, high) if worse_up else (high, low)
            cells = [
                _example_list(name, stage, kind, chosen, b["outputs"], values, inputs, labels)
                for kind, chosen in (("helped", helped), ("hurt", hurt))
            ]
            rows.append(f"<tr><th>{_e(stage)}</th>{''.join(cells)}</tr>")
        figure = _new_figure((6.4, 2.9))
        ax = figure.subplots()
        for stage in stages:
            values = np.array(_floats(b["effects"][stage], len(b["outputs"])))
            values = values[np.isfinite(values)]
            if len(values):
                ax.hist(values, bins=40, histtype="step", lw=1.4, label=_t(stage))
        ax.axvline(0, color="#444", lw=0.8)
        ax.set_xlabel(f"per-example effect ({UNITS.get(b['quantity'], b['quantity'])})")
        ax.set_ylabel("examples")
        ax.set_yscale("symlog", linthresh=1)  # a few large effects stay visible beside many
        ax.legend(title="stage", fontsize=8, title_fontsize=8)
        caption = f"Distribution of the per-example effects of each stage on {name}."
        parts.append(
            f"<h3>{_e(name)} <small>({_e(_describe(b))})</small></h3>\n"
            f'<table class="examples" data-behavior="{_e(name)}"><tr><th>stage</th>'
            f"<th>helped most</th><th>hurt most</th></tr>{''.join(rows)}</table>\n"
            f"{_figure(figure, f'per-example effects on {name}', caption)}"
        )
    return "\n".join(parts)


def _example_list(
    behavior: str,
    stage: str,
    kind: str,
    chosen: list[int],
    outputs: Sequence[str],
    values: np.ndarray,
    inputs: Any,
    labels: Any,
) -> str:
    if not chosen:
        return f'<td data-kind="{kind}">none</td>'
    items = []
    for i in chosen:
        index = _index(behavior, outputs[i], i)
        picture = _thumbnail(inputs, index)
        label = ""
        if labels is not None and 0 <= index < len(labels):
            label = f" label {int(labels[index])}"
        items.append(
            f'<div class="ex" data-stage="{_e(stage)}" data-kind="{kind}" data-index="{index}" '
            f'data-value="{float(values[i])!r}">{picture}<span>#{index}{_e(label)}</span>'
            f'<span class="num">{_num(float(values[i]))}</span></div>'
        )
    return f'<td data-kind="{kind}">{"".join(items)}</td>'


def _schedule(traj: Trajectory) -> str:
    figure = _new_figure((8, 3.0))
    ax = figure.subplots()
    start = 0
    positive = []
    try:
        for k, record in enumerate(traj.stages):
            lr = traj.steps(k).lr.numpy()
            steps = np.arange(start, start + lr.shape[0])
            color = f"C{k % 10}"
            for g in range(lr.shape[1]):
                label = _t(record.name) + (f" (group {g})" if lr.shape[1] > 1 else "")
                style = ("-", "--", ":", "-.")[g % 4]
                ax.plot(steps, lr[:, g], style, color=color, lw=1.5, label=label)
                positive += [v for v in lr[:, g] if v > 0]
            if k:
                ax.axvline(start - 0.5, color="#888", lw=0.9, ls="--")
            ax.annotate(
                _t(record.name),
                (start + lr.shape[0] / 2, 1.0),
                xycoords=("data", "axes fraction"),
                ha="center",
                va="bottom",
                fontsize=9,
            )
            start += lr.shape[0]
    except StagetraceError as exc:
        return f'<p class="note">The learning rates could not be read: {_e(exc)}</p>'
    if positive and max(positive) / min(positive) > 50:
        ax.set_yscale("log")
    ax.set_xlabel("global step")
    ax.set_ylabel("learning rate")
    ax.legend(fontsize=8, loc="best")
    ax.margins(x=0.01)
    caption = (
        "The learning rate of every step (per parameter group), stages one after another; "
        "dashed lines are the stage boundaries. A stage trained at a high rate late in the run "
        "moves the parameters most, and later stages at full strength can undo an earlier one."
    )
    total = sum(r.num_steps for r in traj.stages)
    return f"<p>{total} steps in all.</p>\n" + _figure(figure, "learning rate schedule", caption)


def _evidence(traj: Trajectory, data: Mapping[str, Any], extra: Sequence[Mapping[str, Any]]) -> str:
    held = available_evidence(traj)
    rows = "".join(
        f'<tr data-evidence="{_e(key)}"><td><code>{_e(key)}</code></td><td>{_e(text)}</td>'
        f"<td>{_yes(key in held)}</td></tr>"
        for key, text in EVIDENCE.items()
    )
    allowed = []
    for name, cls in ESTIMATORS.items():
        try:
            check_evidence([build(name)], traj)
            verdict = _yes(True)
        except StagetraceError as exc:
            verdict = f'<span class="no">no</span>: {_e(str(exc).split(". Fix:")[0])}'
        needs = ", ".join(sorted(cls.requires))
        allowed.append(
            f'<tr data-estimator="{_e(name)}"><td><code>{_e(name)}</code></td>'
            f"<td><small>{_e(needs)}</small></td><td>{verdict}</td></tr>"
        )
    problem = replay_problem(traj)
    replay = (
        "<p>The recording <b>can be replayed</b>: the truth (retraining without each stage) and "
        "replay estimates (subset, E2, E4) can be computed.</p>"
        if problem is None
        else f'<p class="note">The recording cannot be replayed: {_e(problem)}. Only the '
        "estimators that do not replay the later stages are possible, and their estimates on "
        "stages before the last are unreliable.</p>"
    )
    rows_given = [*(data.get("evidence") or []), *extra]
    carried = ""
    if rows_given:
        carried = "<h3>Evidence reported with the audit</h3>\n" + _generic(list(rows_given))
    return (
        f'{replay}\n<table id="evidence-table"><tr><th>evidence</th><th>what</th>'
        f"<th>held</th></tr>{rows}</table>\n"
        "<h3>Estimators this recording allows</h3>\n"
        f'<table id="estimators-table"><tr><th>estimator</th><th>needs</th><th>allowed</th></tr>'
        f"{''.join(allowed)}</table>\n{carried}"
    )


def _validated(validation: tuple[Mapping[str, Any], Validation | None, str]) -> str:
    found, obj, source = validation
    rows = [r for r in found.get("rows") or [] if isinstance(r, Mapping)]
    group_rows = [r for r in found.get("group_rows") or [] if isinstance(r, Mapping)]
    parts = [
        f"<p>From {_e(source)} (trajectory <code>{_e(found.get('trajectory', '?'))}</code>; "
        f"retraining took {_num(found.get('ground_truth_seconds'), '.2f')} s). Each estimate "
        "against the truth: points on the diagonal are exact.</p>"
    ]
    if not rows and not group_rows:
        return parts[0] + "<p>It holds no rows.</p>"
    points: dict[str, list[tuple[str, float, float]]] = {}
    for r in rows:
        key = f"{r.get('estimator')}:{r.get('readout')}"
        true = _float(r.get("mean_effect_true"))
        points.setdefault(key, []).append(
            (str(r.get("stage")), _float(r.get("mean_effect_error")) + true, true)
        )
    for r in group_rows:
        key = f"{r.get('estimator')}:{r.get('readout')}"
        points.setdefault(key, []).append(
            (str(r.get("stage")), _float(r.get("estimated")), _float(r.get("true")))
        )
    parts.append(
        _figure(
            _scatter_grid({k: {"": v} for k, v in points.items()}),
            "estimated against true effects",
            "Mean effects of the per-example behaviours and effects on the group outputs: "
            "estimate (vertical) against the truth (horizontal), one panel per estimator and "
            "read-out, coloured by stage.",
        )
    )
    kept = obj.effects if obj is not None and obj.effects else None
    if kept and "truth" in kept:
        for behavior, truth in kept["truth"].items():
            panels = {
                key: {
                    stage: (estimated[behavior][stage], truth[stage])
                    for stage in truth
                    if stage in estimated.get(behavior, {})
                }
                for key, estimated in kept.items()
                if key != "truth" and behavior in estimated
            }
            if panels:
                parts.append(
                    f"<h3>{_e(behavior)}: per example</h3>\n"
                    + _figure(
                        _per_example_grid(panels),
                        f"per-example estimates against the truth, {behavior}",
                        "One point per example: estimated against true effect, per estimator "
                        "and read-out (rows) and stage (columns).",
                    )
                )
    if rows:
        head = (
            "<tr><th>estimator</th><th>read-out</th><th>behaviour</th><th>stage</th>"
            "<th>Pearson</th><th>sign agr.</th><th>mean effect (true)</th>"
            "<th>mean-effect error</th></tr>"
        )
        body = "".join(
            f"<tr><td>{_e(r.get('estimator'))}</td><td>{_e(r.get('readout'))}</td>"
            f"<td>{_e(r.get('behavior'))}</td><td>{_e(r.get('stage'))}</td>"
            f'<td class="num">{_num(r.get("pearson"), ".3f")}</td>'
            f'<td class="num">{_num(r.get("sign_agreement"), ".3f")}</td>'
            f'<td class="num">{_num(r.get("mean_effect_true"))}</td>'
            f'<td class="num">{_num(r.get("mean_effect_error"))}</td></tr>'
            for r in rows
        )
        parts.append(f'<table id="validation-table">{head}{body}</table>')
    return "\n".join(parts)


def _more(extra: Mapping[str, Any]) -> str:
    return "\n".join(f"<h3>{_e(key)}</h3>\n{_generic(value)}" for key, value in extra.items())


# --- figures --------------------------------------------------------------------------------


def _new_figure(size: tuple[float, float]) -> Figure:
    """A figure on matplotlib's Agg canvas (no pyplot, no global backend; imported on first
    use so the command line starts fast)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _figure(figure: Figure, alt: str, caption: str) -> str:
    """The figure as an inline PNG with its caption (plain text)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return (
        f'<figure><img alt="{_e(alt)}" src="{_png(buffer.getvalue())}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _png(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _panels(count: int, columns: int, size: tuple[float, float]) -> tuple[Figure, list[Any]]:
    rows = math.ceil(count / columns)
    figure = _new_figure((size[0] * columns, size[1] * rows))
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for ax in axes[count:]:
        ax.set_axis_off()
    return figure, axes


def _scatter_grid(panels: Mapping[str, Mapping[str, list[tuple[str, float, float]]]]) -> Figure:
    """One panel per key: (stage, estimated, true) points coloured by stage, with y = x."""
    columns = min(3, len(panels))
    figure, axes = _panels(len(panels), columns, (3.4, 3.0))
    stages: list[str] = []
    for points in panels.values():
        for stage, _, _ in points[""]:
            if stage not in stages:
                stages.append(stage)
    for ax, (key, points) in zip(axes, panels.items(), strict=False):
        for i, stage in enumerate(stages):
            mine = [(e, t) for s, e, t in points[""] if s == stage]
            if mine:
                est, tru = zip(*mine, strict=True)
                ax.scatter(tru, est, s=22, color=f"C{i % 10}", label=_t(stage))
        _diagonal(ax, [p[2] for p in points[""]] + [p[1] for p in points[""]])
        ax.set_title(_t(key), fontsize=9)
        ax.set_xlabel("true effect", fontsize=8)
        ax.set_ylabel("estimated effect", fontsize=8)
        ax.legend(fontsize=7)
    return figure


def _per_example_grid(panels: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]]) -> Figure:
    """Rows: estimator and read-out; columns: stages; per example, estimated against true."""
    stages = list(next(iter(panels.values())))
    figure = _new_figure((3.0 * len(stages), 2.7 * len(panels)))
    axes = figure.subplots(len(panels), len(stages), squeeze=False)
    for r, (key, by_stage) in enumerate(panels.items()):
        for c, stage in enumerate(stages):
            ax = axes[r][c]
            if stage not in by_stage:
                ax.set_axis_off()
                continue
            est, tru = (np.asarray(a, dtype=float) for a in by_stage[stage])
            ax.scatter(tru, est, s=5, alpha=0.5, color=f"C{c % 10}")
            _diagonal(ax, [*tru.tolist(), *est.tolist()])
            ax.set_title(_t(f"{key}, {stage}"), fontsize=8)
            ax.tick_params(labelsize=7)
            if c == 0:
                ax.set_ylabel("estimated", fontsize=8)
            if r == len(panels) - 1:
                ax.set_xlabel("true", fontsize=8)
    return figure


def _diagonal(ax: Any, values: list[float]) -> None:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return
    low, high = min(finite), max(finite)
    pad = 0.05 * (high - low) or 0.05 * max(abs(high), 1e-12)
    ax.plot([low - pad, high + pad], [low - pad, high + pad], color="#888", lw=0.8, ls="--")
    ax.axhline(0, color="#ccc", lw=0.6)
    ax.axvline(0, color="#ccc", lw=0.6)


def _thumbnail(inputs: Any, index: int) -> str:
    """An example's input as a small inline PNG when it looks like an image (float [H, W],
    [1|3, H, W], or a flattened square [H*W]); else nothing."""
    if inputs is None or not 0 <= index < len(inputs):
        return ""
    array = np.asarray(inputs[index].detach().cpu() if hasattr(inputs, "detach") else inputs[index])
    if not np.issubdtype(array.dtype, np.floating):
        return ""
    if array.ndim == 1:
        side = math.isqrt(array.size)
        if side < 4 or side * side != array.size:
            return ""
        array = array.reshape(side, side)
    elif array.ndim == 3 and array.shape[0] in (1, 3):
        array = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    elif array.ndim != 2:
        return ""
    array = array.astype(np.float64)
    low, high = np.nanmin(array), np.nanmax(array)
    scaled = (array - low) / (high - low) if high > low else np.zeros_like(array)
    image = Image.fromarray(np.nan_to_num(scaled * 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return f'<img alt="example {index}" src="{_png(buffer.getvalue())}">'


# --- helpers --------------------------------------------------------------------------------


def _validation(
    validation: Validation | Mapping[str, Any] | None, folder: Path
) -> tuple[Mapping[str, Any], Validation | None, str] | None:
    """The validation's JSON, the object and its source; ``folder/validation.json`` when none is
    given. A file that is not a validation is named in the report, not fatal: the audit beside
    it stands on its own."""
    if isinstance(validation, Validation):
        return validation.to_json(), validation, "the validation run with this audit"
    if validation is not None:
        return validation, None, "the validation given"
    path = folder / VALIDATION
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        found = {"error": f"{path} could not be read ({exc})"}
    if not isinstance(found, Mapping) or not isinstance(found.get("rows"), list):
        problem = found.get("error") if isinstance(found, Mapping) else None
        return (
            {"rows": [], "group_rows": [], "trajectory": "?", "problem": problem},
            None,
            (f"{path}, which is not a validation result" + (f": {problem}" if problem else "")),
        )
    return found, None, str(path)


def _inputs(examples: Examples | None, name: str) -> tuple[Any, Any]:
    given = (examples or {}).get(name)
    if not given:
        return None, None
    return given[0], (given[1] if len(given) > 1 else None)


def _index(behavior: str, output: str, position: int) -> int:
    """The example index of a per-example output ``"<name>[i]"`` (its position otherwise)."""
    found = re.fullmatch(re.escape(behavior) + r"\[(\d+)\]", str(output))
    return int(found.group(1)) if found else position


def _inner(behavior: str, output: str) -> str:
    """``"<name>[low]"`` -> ``"low"``."""
    prefix = f"{behavior}["
    output = str(output)
    return (
        output[len(prefix) : -1] if output.startswith(prefix) and output.endswith("]") else output
    )


def _describe(b: Mapping[str, Any]) -> str:
    return f"{b['aggregate']} of {b['quantity']}, {UNITS.get(b['quantity'], b['quantity'])}"


def _worse(value: float, behavior: Mapping[str, Any]) -> bool | None:
    """Whether the effect made the behaviour worse (None: neither, or a gap, which has no
    better side)."""
    if not math.isfinite(value) or value == 0 or behavior["aggregate"] == "group_gap":
        return None
    return (value > 0) == HIGHER_IS_WORSE.get(behavior["quantity"], True)


def _tint(share: float, worse: bool) -> str:
    alpha = 0.12 + 0.5 * min(max(share, 0.0), 1.0)
    return f"rgba(214,39,40,{alpha:.2f})" if worse else f"rgba(44,160,44,{alpha:.2f})"


def _label(label: str) -> str:
    kind = re.sub(r"[^a-z0-9]+", "-", str(label).lower())
    return f'<span class="label label-{kind}">{_e(label)}</span>'


def _yes(held: bool) -> str:
    return '<span class="yes">yes</span>' if held else '<span class="no">no</span>'


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _floats(values: Sequence[Any] | None, count: int = 0) -> list[float]:
    """Numbers as floats, NaN for none (a stage without a number has ``None`` for its list)."""
    return [math.nan] * count if values is None else [_float(v) for v in values]


def _num(value: Any, spec: str = "+.4g") -> str:
    """A number as shown: ``no number`` for None, the text of anything not a number."""
    if value is None:
        return "no number"
    number = _float(value)
    return _e(value) if math.isnan(number) else format(number, spec)


def _generic(value: Any) -> str:
    """Any JSON value as HTML: a mapping as a two-column table, a list of mappings as a table
    with a column per key, other lists joined, scalars as text."""
    if isinstance(value, Mapping):
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{_generic(v)}</td></tr>" for k, v in value.items())
        return f'<table class="generic">{rows}</table>'
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
        keys = list(dict.fromkeys(k for v in value for k in v))
        head = "".join(f"<th>{_e(k)}</th>" for k in keys)
        rows = "".join(
            "<tr>" + "".join(f"<td>{_generic(v.get(k, ''))}</td>" for k in keys) + "</tr>"
            for v in value
        )
        return f'<table class="generic"><tr>{head}</tr>{rows}</table>'
    if isinstance(value, (list, tuple)):
        return ", ".join(_generic(v) for v in value)
    if isinstance(value, float):
        return _num(value, ".4g")
    return _e(value)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _t(text: Any) -> str:
    """Text for matplotlib: dollar signs escaped, so a name is never read as mathtext."""
    return str(text).replace("$", r"\$")
