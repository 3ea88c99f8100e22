"""The trust boundary: opening a run directory never runs code it names unless the user trusted
that module (``attribution.record.references``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attribution.analysis.cli import main
from attribution.record.errors import SpecError
from attribution.record.references import TRUST_ENV, Ref, resolve, trust, trusted_modules


def attack(marker: Path) -> dict:
    """A reference that would create ``marker`` if it were ever called."""
    return {"target": "subprocess:run", "kwargs": {"args": f"touch {marker}", "shell": True}}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_a_manifest_naming_foreign_code_is_refused_before_import(run_copy, tmp_path, capsys):
    marker = tmp_path / "pwned"
    manifest = json.loads((run_copy / "manifest.json").read_text())
    manifest["model"] = attack(marker)
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    code, err = run_cli(capsys, "replay", run_copy, "--verify")
    assert code == 2
    assert not marker.exists()
    assert "'subprocess:run'" in err and "not trusted" in err
    assert f"--trust-module subprocess or set {TRUST_ENV}=subprocess" in err


def test_a_behaviours_file_naming_foreign_code_is_refused(run_copy, tmp_path, capsys):
    marker = tmp_path / "pwned"
    behaviors = {"evil": {"data": attack(marker), "quantity": "loss"}}
    (run_copy / "behaviors.yaml").write_text(json.dumps(behaviors))
    code, err = run_cli(capsys, "audit", run_copy, "--estimator", "e0")
    assert code == 2
    assert not marker.exists()
    assert "not trusted" in err and "Fix:" in err


def test_a_trusted_module_re_exporting_foreign_code_does_not_launder_it():
    with pytest.raises(SpecError, match="names code in 'os'"):
        resolve("attribution.record.store:os")
    assert resolve("experiments.models:MLP").__name__ == "MLP"


def test_the_environment_and_trust_extend_the_allowlist(monkeypatch):
    with pytest.raises(SpecError, match="not trusted"):
        Ref("json:dumps", {"obj": 1}).call()
    monkeypatch.setenv(TRUST_ENV, "json, email")
    assert Ref("json:dumps", {"obj": 1}).call() == "1"
    assert {"json", "email"} <= set(trusted_modules())
    with pytest.raises(SpecError, match="not a module name"):
        trust("json; rm -rf /")


def test_the_recorder_trusts_the_references_its_user_names_in_code(monkeypatch):
    from attribution.record import references
    from attribution.record.recorder import Recorder
    from tests.estimators.toy import Additive

    monkeypatch.setattr(references, "_trusted", set())
    ref = Ref("tests.estimators.toy:Additive", {"out_features": 2})
    with pytest.raises(SpecError, match="not trusted"):
        ref.call()
    Recorder(None, Additive(out_features=2), ref)
    assert references.is_trusted("tests.estimators.toy")
