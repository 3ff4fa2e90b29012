"""The command line: bad configs stop before any work with a short message listing the valid choices. The
command lines run in this process (tests/helpers/cli.py) but one: a real ``python -m align.run``."""
import os

import pytest

from align.setup.overrides import ConfigProblem, check_overrides
from align.setup.compose import CONF_DIR, compose_config
from helpers.cli import align_run, subprocess_run


@pytest.mark.parametrize("override,needles", [
    ("algo=nope", ["unknown algo 'nope'", "vggflow", "refl", "draft"]),
    ("model=nope", ["unknown model 'nope'", "gmm"]),
    ("reward=nope", ["unknown reward 'nope'", "linear", "quadratic"]),
    ("algo.nope=1", ["unknown key 'algo.nope'", "beta", "eta"]),
    ("train.stepz=3", ["unknown key 'train.stepz'", "steps", "batch_size"]),
    ("nope=1", ["unknown key 'nope'", "algo", "train"]),
])
def test_unknown_names_are_listed(override, needles):
    with pytest.raises(ConfigProblem) as err:
        check_overrides([override], CONF_DIR)
    for n in needles:
        assert n in str(err.value)


def test_model_defaults_to_the_rewards_domain():
    assert check_overrides(["reward=quadratic"], CONF_DIR)[-1] == "model=gmm"
    assert check_overrides(["-m", "algo=vggflow,refl", "seed=0,1"], CONF_DIR)[-1] == "model=digits"
    assert check_overrides(["model=gmm"], CONF_DIR) == ["model=gmm", "reward=linear"]


def test_model_alone_picks_its_default_reward():
    cfg = compose_config(["model=gmm"])
    assert (cfg.model.name, cfg.reward.name, cfg.train.steps, cfg.train.batch_size) == ("gmm", "linear", 200, 32)
    cfg = compose_config([])
    assert (cfg.algo.name, cfg.model.name, cfg.reward.name) == ("vggflow", "digits", "digits_thickness")
    assert (cfg.train.steps, cfg.train.batch_size, cfg.eval.every, cfg.eval.n_samples) == (60, 8, 20, 160)
    with pytest.raises(ConfigProblem, match="different default rewards"):
        check_overrides(["-m", "model=gmm,digits"], CONF_DIR)


def test_sweeps_check_every_combination():
    with pytest.raises(ConfigProblem, match="unknown algo 'nope'"):
        check_overrides(["-m", "algo=vggflow,nope"], CONF_DIR)


def test_cli_errors_have_no_traceback_and_leave_no_run_directory(tmp_path):
    for args in (["algo=nope"], ["algo.eta=t3"], ["model=gmm", "model.weights=[1,2,3]"], ["train.steps=0"]):
        res = align_run(*args, f"run_dir={tmp_path / 'r'}", cwd=tmp_path)
        assert res.returncode == 2, res.stderr
        assert "Traceback" not in res.stderr and res.stderr.startswith("align: "), res.stderr
        assert len(res.stderr.strip().splitlines()) <= 3
        assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_cli_single_run_and_multirun(tmp_path):
    common = ["reward=linear", "train.steps=2", "train.batch_size=4", "eval.n_samples=16", "eval.final_samples=8",
              "train.progress=false"]
    # the real command: a new Python process, `python -m align.run`, its exit status and output as the shell sees them
    res = subprocess_run("align.run", [*common, f"run_dir={tmp_path / 'one'}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "align: done. eval reward" in res.stdout and res.stderr == "", res.stderr
    assert (tmp_path / "one" / "samples_final.pt").exists()
    res = align_run("-m", *common, "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    runs = sorted(r for r in os.listdir(tmp_path / "sweep") if "seed=" in r)   # one directory per job
    assert len(runs) == 2 and "seed=0" in runs[0] and "seed=1" in runs[1]
    for r in runs:
        assert (tmp_path / "sweep" / r / "metrics.jsonl").exists()
