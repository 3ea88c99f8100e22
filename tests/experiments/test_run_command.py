"""``python -m experiments.run`` as a user runs it: bad input exits 2 with one message and writes
nothing, a run directory holds one configuration, an interrupted run resumes and says so, seeds
derive from ``seed``, results are written atomically, and ``trust_modules`` lets a config name
the user's own package.

Independent truths: the bytes of every file of a run directory before and after a refused
re-run; a resumed recording against the checksums of an uninterrupted one; the composed configs
against ``seed * 1000 + k`` written out by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from attribution.record.spec import PipelineSpec
from attribution.record.trajectory import Trajectory
from experiments import derive
from experiments.tasks.setup import write_result
from tests.helpers import edit_manifest, tree_bytes

REPO = Path(__file__).resolve().parents[2]
SMOKE = {
    "stages_mnist": "preset=smoke",
    "spurious_image": "preset=spurious_smoke",
    "fidelity": "preset=fidelity_smoke",
}


def command(run_dir: Path, experiment: str, *overrides: str, env: dict | None = None):
    """Run the task ``experiment`` at its smoke preset into ``run_dir``, on one thread."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.run",
            f"experiment={experiment}",
            SMOKE[experiment],
            f"hydra.run.dir={run_dir}",
            *overrides,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def check_refused(done: subprocess.CompletedProcess, *names: str) -> None:
    """Exit 2, one line on stderr that names ``names`` and says how to fix it, no traceback."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stagetrace: error: "), done.stderr
    assert "Fix:" in lines[0], lines[0]
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"


BAD_INPUT = [
    # errors our checks catch (SpecErrors of the pipeline, the task's own settings)
    ("stages_mnist", ["pipeline.stages.pretrain.optimizer.type=sgdd"], ["optimizer.type", "sgdd"]),
    ("stages_mnist", ["pipeline.stages.pretrain.lr=-0.1"], ["pretrain", "learning rate"]),
    ("stages_mnist", ["pipeline.stages.finetune.lr=0"], ["finetune", "learning rate"]),
    ("stages_mnist", ["pipeline.stages.adapt.steps=0"], ["adapt.steps"]),
    ("stages_mnist", ["pipeline.stages.pretrain.schedule.name=cosin"], ["schedule", "cosin"]),
    ("stages_mnist", ["seed=-1"], ["seed", "-1"]),
    ("stages_mnist", ["trust_modules=mypkg"], ["trust_modules"]),
    ("spurious_image", ["audit.behavior=misled_los"], ["audit.behavior", "misled_los"]),
    ("spurious_image", ["audit.readout=evaluate"], ["audit.readout", "evaluate"]),
    ("spurious_image", ["audit.estimator=e9"], ["audit.estimator", "e9"]),
    # Hydra's own errors in composing the config, before any task runs
    ("fidelity", ["later=nosuch"], ["later/nosuch", "sgd_momentum"]),
    ("stages_mnist", ["pipline.seed=3"], ["pipline.seed"]),
    ("stages_mnist", ["seed=[1"], ["[1"]),
]


@pytest.mark.parametrize(("experiment", "overrides", "names"), BAD_INPUT)
def test_bad_input_exits_2_with_one_message_and_leaves_no_run_directory(
    tmp_path, experiment, overrides, names
):
    run_dir = tmp_path / "run"
    check_refused(command(run_dir, experiment, *overrides), *names)
    assert not run_dir.exists()
    assert list(tmp_path.iterdir()) == []


def test_bad_input_in_a_sweep_leaves_no_sweep_directory(tmp_path):
    sweep = tmp_path / "sweep"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.run",
            "-m",
            "experiment=stages_mnist",
            "preset=smoke",
            "pipeline.stages.pretrain.lr=-1,0.05",
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    check_refused(done, "pretrain", "learning rate")
    assert not sweep.exists()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A finished stages_mnist smoke run (without its ground truth), and its files' bytes."""
    run_dir = tmp_path_factory.mktemp("recorded") / "run"
    done = command(run_dir, "stages_mnist", "ground_truth=false")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    return copy


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["seed=1"], ["config.resolved.yaml", "seed", "pipeline.stages.pretrain.seed"]),
        (["ground_truth=true"], ["another configuration", "ground_truth"]),
        (["pipeline.stages.pretrain.optimizer.type=sgdd"], ["optimizer.type"]),
        (["evaluation.batch_size=7"], ["evaluation.batch_size"]),
    ],
)
def test_a_refused_rerun_leaves_every_file_of_the_run_as_it_was(
    recorded, tmp_path, overrides, names
):
    run_dir = copy_of(recorded, tmp_path)
    before = tree_bytes(run_dir)
    check_refused(command(run_dir, "stages_mnist", "ground_truth=false", *overrides), *names)
    assert tree_bytes(run_dir) == before


def test_a_trajectory_of_another_pipeline_is_refused_before_anything_is_written(recorded, tmp_path):
    # no config.resolved.yaml to compare with: the trajectory's own refusal applies
    run_dir = copy_of(recorded, tmp_path)
    (run_dir / "config.resolved.yaml").unlink()
    (run_dir / "behaviors.yaml").unlink()
    before = tree_bytes(run_dir)
    done = command(run_dir, "stages_mnist", "ground_truth=false", "seed=1")
    check_refused(done, "manifest.json", "different pipeline")
    assert tree_bytes(run_dir) == before


def test_an_interrupted_run_resumes_and_says_what_it_found(recorded, tmp_path):
    run_dir = copy_of(recorded, tmp_path)

    def interrupt_after_pretraining(m):
        m["stages"] = m["stages"][:1]
        m["complete"] = False

    edit_manifest(run_dir / "trajectory", interrupt_after_pretraining)
    done = command(run_dir, "stages_mnist", "ground_truth=false")
    assert done.returncode == 0, done.stderr[-3000:]
    log = (run_dir / "run.log").read_text()
    assert "resuming the run in" in log and "1 of 3 stages already recorded" in log
    assert "recorded 2 stages in" in log and "(1 found already recorded)" in log
    # the resumed recording is the uninterrupted one, file for file
    resumed, whole = Trajectory.open(run_dir), Trajectory.open(recorded)
    assert resumed.complete and resumed.names == whole.names
    assert resumed.fingerprint() == whole.fingerprint()
    # a finished run is reused, and says so
    again = command(run_dir, "stages_mnist", "ground_truth=false")
    assert again.returncode == 0
    log = (run_dir / "run.log").read_text()
    assert "its 3 stages are already recorded" in log and "recorded 0 stages" in log


def test_stage_seeds_derive_from_the_root_seed_unless_set():
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        for experiment in SMOKE:
            for seed in (0, 3):
                cfg = compose("config", [f"experiment={experiment}", f"seed={seed}"])
                config = OmegaConf.to_container(cfg, resolve=True)
                spec = PipelineSpec.from_dict(config["pipeline"])
                assert spec.seed == seed
                assert [s.seed for s in spec.stages] == [seed * 1000 + k for k in (1, 2, 3)]
        spurious = OmegaConf.to_container(
            compose("config", ["experiment=spurious_image", "seed=2"]), resolve=True
        )
        data_seeds = [s["data"]["kwargs"]["seed"] for s in spurious["pipeline"]["stages"].values()]
        assert data_seeds == [2011, 2012, 2013]
        assert spurious["evaluation"]["data"]["kwargs"]["seed"] == 2014
        four = compose("config", ["experiment=fidelity", "stages=four", "seed=5"])
        refine = OmegaConf.to_container(four, resolve=True)["pipeline"]["stages"]["refine"]
        assert refine["seed"] == 5004 and refine["data"]["kwargs"]["transforms"][0]["seed"] == 5004
        explicit = compose(
            "config", ["experiment=stages_mnist", "seed=4", "pipeline.stages.finetune.seed=77"]
        )
        stages = OmegaConf.to_container(explicit, resolve=True)["pipeline"]["stages"]
        assert [s["seed"] for s in stages.values()] == [4001, 77, 4003]


def test_the_record_keeps_each_stage_resolved_seed(recorded):
    traj = Trajectory.open(recorded)
    assert [s.seed for s in traj.stages] == [1, 2, 3]  # seed=0
    stages = traj.pipeline["stages"]
    assert [stages[name]["seed"] for name in traj.names] == [1, 2, 3]


def test_derive_refuses_what_is_not_a_seed():
    assert derive(0, 7) == 7 and derive(12, 999) == 12999
    for seed, k in [(-1, 1), (1.5, 1), (True, 1), (1, 1000), ("3", 1)]:
        with pytest.raises(ValueError, match="must be"):
            derive(seed, k)


def test_results_are_written_atomically(tmp_path, monkeypatch):
    path = write_result(tmp_path, "report.md", "first\n")
    assert path == tmp_path / "report.md" and path.read_text() == "first\n"

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_result(tmp_path, "report.md", "second, half written")
    assert path.read_text() == "first\n"  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]  # no temporary left


TRUSTED_PACKAGE = '''
from experiments.models import MLP


def mlp(**kwargs):
    """The project's MLP, built by code in this package."""
    return MLP(**kwargs)
'''


def test_trust_modules_lets_a_config_name_your_own_package(tmp_path):
    package = tmp_path / "code" / "mypkg_trusted"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(TRUSTED_PACKAGE)
    env = {"PYTHONPATH": f"{tmp_path / 'code'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    model = ["model.target=mypkg_trusted:mlp", "ground_truth=false"]
    refused = command(tmp_path / "refused", "stages_mnist", *model, env=env)
    check_refused(refused, "mypkg_trusted", "not trusted")
    assert not (tmp_path / "refused").exists()
    run_dir = tmp_path / "trusted"
    done = command(run_dir, "stages_mnist", *model, "trust_modules=[mypkg_trusted]", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    traj = Trajectory.open(run_dir)
    assert traj.model.target == "mypkg_trusted:mlp" and traj.complete
    manifest = json.loads((run_dir / "trajectory" / "manifest.json").read_text())
    assert manifest["pipeline"]["model"]["target"] == "mypkg_trusted:mlp"


def test_offline_logger_logs_the_fidelity_table_and_its_figures(tmp_path):
    home, run_dir = tmp_path / "home", tmp_path / "run"
    done = command(
        run_dir, "fidelity", "logger=offline", "estimators=[e0,e1,e3]", env={"HOME": str(home)}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (run_dir / "wandb").glob("offline-run-*")
    media = run / "files" / "media"
    (table,) = (media / "table").glob("fidelity_*.table.json")
    logged = json.loads(table.read_text())
    rows = json.loads((run_dir / "fidelity.json").read_text())["rows"]
    assert len(logged["data"]) == len(rows)
    pearson = logged["columns"].index("pearson")
    assert [r[pearson] for r in logged["data"]] == pytest.approx(
        [r["pearson"] for r in rows], nan_ok=True
    )
    figures = sorted(p.name.rsplit("_", 2)[0] for p in (media / "images" / "scatter").glob("*"))
    assert figures == ["test_loss", "test_margin"]
    assert not (home / ".cache" / "wandb").exists()


def test_logger_disabled_writes_nothing_of_wandb(recorded):
    assert not (recorded / "wandb").exists()
