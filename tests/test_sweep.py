"""align.sweep: sweep files expand to deterministic run directories (the ones Hydra's multirun names), a bad
sweep fails before any run starts, and re-running a sweep skips finished runs and resumes interrupted ones
(the rule lives in align.core.run_dir and align.run applies it, so Hydra launchers get it too)."""
import os
import shlex
import shutil

import pytest
from hydra._internal.config_loader_impl import get_overrides_dirname
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from align.setup.overrides import check_overrides
from align.setup.compose import CONF_DIR, compose_config
from align.core.run_dir import RunMismatch, claim_run_dir, plan_existing_run, read_metrics
from align.sweep import hydra_commands, load_sweep, main
from helpers.cli import align_run

TINY = ["model=gmm", "reward=linear", "train.steps=2", "train.batch_size=4", "train.checkpoint_every=1",
        "eval.every=1", "eval.n_samples=16", "eval.final_samples=8"]


def _file(tmp_path, text, name="s.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


GRIDS = """
name: demo
common: [model=gmm, reward=linear, seed=7, train.steps=3]
grids:
  - algo: [vggflow, refl]
    seed: [0, 1]
  - algo: [vggflow]
    algo.beta: [5e4, 0.5]
    seed: [0]
  - {algo: [refl], seed: [1]}          # a duplicate of the first grid: run once
"""


def test_grids_expand_to_their_union_in_deterministic_directories(tmp_path):
    sweep = load_sweep(_file(tmp_path, GRIDS), out=str(tmp_path / "out"))
    names = [r.name for r in sweep.runs]
    assert names == ["algo=vggflow,seed=0", "algo=vggflow,seed=1", "algo=refl,seed=0", "algo=refl,seed=1",
                     "algo.beta=50000.0,algo=vggflow,seed=0", "algo.beta=0.5,algo=vggflow,seed=0"]
    run = sweep.runs[4]
    assert run.dir == os.path.join(str(tmp_path / "out"), run.name)
    # common minus the grid's keys (seed), then the grid's overrides, values as Hydra normalises them
    assert run.overrides == ["model=gmm", "reward=linear", "train.steps=3", "algo=vggflow", "algo.beta=50000.0",
                             "seed=0"]
    again = load_sweep(_file(tmp_path, GRIDS), out=str(tmp_path / "out"))
    assert [(r.name, r.dir, r.overrides) for r in again.runs] == [(r.name, r.dir, r.overrides) for r in sweep.runs]
    assert load_sweep(_file(tmp_path, GRIDS)).out == os.path.join("sweeps", "demo")


def test_hydra_multirun_names_the_same_directories(tmp_path):
    """Each --print-hydra command, expanded as Hydra's basic sweeper does, gives the sweep's directories."""
    sweep = load_sweep(_file(tmp_path, GRIDS), out=str(tmp_path / "out"))
    names = set()
    for cmd in hydra_commands(sweep):
        args = shlex.split(cmd)[4:]
        assert shlex.split(cmd)[:4] == ["python", "-m", "align.run", "-m"]
        hydra = dict(a.split("=", 1) for a in args if a.startswith("hydra."))
        assert hydra["hydra.sweep.dir"] == str(tmp_path / "out")
        exclude = hydra["hydra.job.config.override_dirname.exclude_keys"].strip("[]").split(",")
        task = check_overrides([a for a in args if not a.startswith("hydra.")], CONF_DIR)  # as align.run does
        parser = OverridesParser.create()
        for job in BasicSweeper.split_arguments(parser.parse_overrides(task), None)[0]:
            names.add(get_overrides_dirname(parser.parse_overrides(job), exclude, ",", "="))
    assert names == {r.name for r in sweep.runs}


@pytest.mark.parametrize("text,needle", [
    ("common: [model=gmm, train.stepz=3]\ngrids: [{seed: [0, 1]}]", "unknown key 'train.stepz'"),
    ("common: [model=gmm]\ngrids: [{algo: [vggflow, vgg]}]", "unknown algo 'vgg'"),
    ("common: [model=gmm]\ngrid: [{seed: [0]}]", "unknown top-level keys"),
    ("common: [model=gmm]\ngrids: {seed: [0]}", "grids must be a non-empty list"),
])
def test_a_bad_sweep_fails_before_any_run_starts(tmp_path, capsys, text, needle):
    out = tmp_path / "out"
    assert main([_file(tmp_path, text), "--out", str(out)]) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def _fake_run(run_dir, cfg, checkpoint=None, finished=False, marker=True):
    """A run directory as align writes it; ``marker=False``: as versions before the marker wrote it."""
    os.makedirs(run_dir)
    if marker:
        claim_run_dir(run_dir)
    OmegaConf.save(cfg, os.path.join(run_dir, "config.yaml"), resolve=True)
    open(os.path.join(run_dir, "metrics.jsonl"), "w").close()
    if checkpoint is not None:
        os.makedirs(os.path.join(run_dir, "checkpoints", f"step_{checkpoint:07d}"))
        open(os.path.join(run_dir, "checkpoints", f"step_{checkpoint:07d}", "state.pt"), "w").close()
    if finished:
        open(os.path.join(run_dir, "samples_final.pt"), "w").close()


def test_plan_for_an_existing_run_directory(tmp_path):
    def req(*extra):
        return OmegaConf.to_container(compose_config(TINY + list(extra)), resolve=True)

    cfg = compose_config(TINY)
    assert plan_existing_run(str(tmp_path / "none"), req()) == "start"
    _fake_run(str(tmp_path / "partial"), cfg)
    assert plan_existing_run(str(tmp_path / "partial"), req()) == "start"
    _fake_run(str(tmp_path / "ckpt"), cfg, checkpoint=1)
    assert plan_existing_run(str(tmp_path / "ckpt"), req("threads=4", "train.progress=false")) == "resume"
    _fake_run(str(tmp_path / "old"), cfg, checkpoint=1, marker=False)     # config.yaml + checkpoint: ours
    assert plan_existing_run(str(tmp_path / "old"), req()) == "resume"
    _fake_run(str(tmp_path / "foreign"), cfg, marker=False)                # no marker, no checkpoint: not ours
    with pytest.raises(RunMismatch, match="align did not create"):
        plan_existing_run(str(tmp_path / "foreign"), req())
    _fake_run(str(tmp_path / "done"), cfg, checkpoint=2, finished=True)
    assert plan_existing_run(str(tmp_path / "done"), req()) == "skip"
    assert plan_existing_run(str(tmp_path / "done"), req("train.steps=4")) == "resume"     # extend
    with pytest.raises(RunMismatch, match="train.batch_size: saved 4, requested 8"):
        plan_existing_run(str(tmp_path / "done"), req("train.batch_size=8"))
    with pytest.raises(RunMismatch, match="algo.name"):
        plan_existing_run(str(tmp_path / "ckpt"), req("algo=refl"))
    with pytest.raises(RunMismatch, match="already trained to step 2"):
        plan_existing_run(str(tmp_path / "done"), req("train.steps=1"))


SMALL = f"""
name: tiny
common: [{', '.join(TINY)}]
grids:
  - seed: [0, 1]
"""


@pytest.mark.slow
def test_a_real_sweep_runs_skips_and_resumes(tmp_path, capsys):
    sweep_file, out = _file(tmp_path, SMALL), tmp_path / "out"
    args = [sweep_file, "--out", str(out), "--jobs", "2"]
    assert main(args) == 0
    assert "ran 2, resumed 0, skipped 0, failed 0" in capsys.readouterr().out
    one = out / "seed=1"
    assert (one / "samples_final.pt").exists() and (one / "run.log").exists()

    assert main(args) == 0                                       # re-run: nothing to do, no subprocess
    assert "ran 0, resumed 0, skipped 2, failed 0" in capsys.readouterr().out

    os.remove(one / "samples_final.pt")                          # interrupted after the step-1 checkpoint
    shutil.rmtree(one / "checkpoints" / "step_0000002")
    assert main(args) == 0
    assert "ran 0, resumed 1, skipped 1, failed 0" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(str(one))] == [0, 1, 2]
    assert (one / "samples_final.pt").exists()

    assert main(args + ["train.batch_size=8"]) == 2              # another config into the same directories
    err = capsys.readouterr().err
    assert "different config" in err and "train.batch_size: saved 4, requested 8" in err

    run = [*TINY, "seed=1", f"run_dir='{one}'"]                  # align.run itself (Hydra launchers)
    res = align_run(*run)
    assert res.returncode == 0 and f"{one} already finished, skipping" in res.stdout, res.stderr
    res = align_run(*run, "train.batch_size=8")
    assert res.returncode == 2 and "holds a run of a different config" in res.stderr
    assert "Traceback" not in res.stderr
