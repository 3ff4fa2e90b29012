"""What a hostile (or careless) user types is refused before any work with one line naming the key or the file and
the way forward, or works as it should: ``+key`` cannot add a setting to a typed section (nor ``~key`` delete one),
the saved config.yaml names its files by absolute path (a run resumes from any directory), ``align.evaluate``
takes a sweep run's directory whose name holds '=', and read-only folders, broken YAML, odd sweep files and a
prompts "file" that is a directory get a message instead of a traceback. Argument checks run ``align.run.main`` /
``align.sweep.main`` / ``align.evaluate.main`` in this process (tests/helpers/cli.py), in the folder under test."""
import hashlib
import json
import os
import shutil
import subprocess
from contextlib import contextmanager

import pytest

from align.core.run_dir import CONFIG_FILE, read_config, read_metrics
from align.evaluate import main as evaluate_main
from align.setup.compose import compose_config
from align.setup.overrides import ConfigProblem
from align.sweep import main as sweep_main, quote
from helpers.cli import align_run, run_main

TINY = ["model=gmm", "reward=linear", "algo=vggflow", "train.batch_size=4", "eval.n_samples=16",
        "eval.final_samples=8", "eval.every=0", "train.progress=false", "threads=1"]
TRAINED = TINY + ["train.steps=2", "train.checkpoint_every=1"]
# a differentiable callable reward of the gmm domain, read from a file by a relative path (reward=callable)
REWARD_FILE = ("import torch\n\nclass Scaled:\n    def __init__(self, scale=1.0):\n        self.scale = scale\n\n"
               "    def __call__(self, x, prompts):\n        return self.scale * x[:, 0]\n")


def _one_line(err: str, prefix: str = "align: ") -> bool:
    return err.startswith(prefix) and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _checksums(folder) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny gmm run: checkpoints at steps 1 and 2."""
    run = tmp_path_factory.mktemp("finished") / "run"
    res = align_run(*TRAINED, f"run_dir={run}")
    assert res.returncode == 0, res.stderr
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A copy of the finished run, in this test's folder (which the test may change as it likes)."""
    return shutil.copytree(finished_run, tmp_path / "run")


@pytest.fixture(scope="module")
def relative_run(tmp_path_factory):
    """A finished tiny gmm run trained in its own folder with a relative prompts file and a relative reward file;
    returns (that folder, the run directory)."""
    home = tmp_path_factory.mktemp("home")
    (home / "pr_ok.txt").write_text("a point\n")
    (home / "my_reward.py").write_text(REWARD_FILE)
    res = align_run(*TRAINED, "prompts=file:pr_ok.txt", "reward=callable", "reward.target=my_reward.py:Scaled",
                    "reward.differentiable=true", "reward.domain=gmm", "run_dir=run", cwd=home)
    assert res.returncode == 0, res.stderr
    return home, home / "run"


@contextmanager
def read_only(folder):
    """``folder`` and everything in it read-only for the block: ``chmod a-w``, or for root (whom modes do not stop)
    the immutable attribute; the test is skipped where neither stops a write."""
    root = os.geteuid() == 0
    cmd = ["chattr", "-R", "+i", str(folder)] if root else ["chmod", "-R", "a-w", str(folder)]
    made = subprocess.run(cmd, capture_output=True).returncode == 0
    try:
        probe = os.path.join(folder, "probe")
        try:
            open(probe, "w").close()
            os.remove(probe)
            pytest.skip("cannot make a folder read-only here")
        except OSError:
            pass
        yield
    finally:
        if made:
            undo = ["chattr", "-R", "-i", str(folder)] if root else ["chmod", "-R", "u+w", str(folder)]
            subprocess.run(undo, check=True)


# ---- A: a typed section's keys are its dataclass's fields ------------------------------------------------------

PLUS_KEYS = [("+algo.betaa=3", "unknown key 'algo.betaa' (did you mean algo.beta?); algo=vggflow has the keys"),
             ("+reward.scal=5", "unknown key 'reward.scal' (did you mean reward.scale?); reward=linear has the keys"),
             ("+reward._target_=os.system", "unknown key 'reward._target_'; reward=linear has the keys"),
             ("+model.hiddn=64", "unknown key 'model.hiddn' (did you mean model.hidden?); model=gmm has the keys"),
             ("+train.stepz=3", "unknown key 'train.stepz' (did you mean train.steps?); train has the keys"),
             ("++algo.betaa=3", "unknown key 'algo.betaa' (did you mean algo.beta?)"),
             ("+seeed=1", "unknown key 'seeed' (did you mean seed?); the run's config has the keys")]


@pytest.mark.parametrize("override,message", PLUS_KEYS, ids=[o for o, _ in PLUS_KEYS])
def test_a_plus_key_in_a_typed_section_is_refused_with_the_nearest_key(tmp_path, override, message):
    res = align_run(*TINY, "train.steps=1", override, f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 2 and _one_line(res.stderr), res.stderr
    assert message in res.stderr and "+" not in res.stderr, res.stderr
    assert os.listdir(tmp_path) == []


def test_an_unknown_key_of_a_typed_section_is_not_told_to_use_plus(tmp_path):
    res = align_run(*TINY, "algo.betaa=3", f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 2 and _one_line(res.stderr), res.stderr
    assert "did you mean algo.beta?" in res.stderr and "+algo" not in res.stderr, res.stderr


DELETIONS = [("~algo.beta", "~algo.beta: algo.beta is a setting of algo=vggflow and cannot be deleted; "
                            "give algo.beta=<value>"),
             ("~seed", "~seed: seed is a setting of the run's config and cannot be deleted; give seed=<value>"),
             ("~algo", "~algo: a run needs its algo; choose one with algo=<name> (valid choices: adjoint_matching")]


@pytest.mark.parametrize("override,message", DELETIONS, ids=[o for o, _ in DELETIONS])
def test_deleting_a_typed_setting_is_refused(tmp_path, override, message):
    res = align_run(*TINY, "train.steps=1", override, f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 2 and _one_line(res.stderr) and message in res.stderr, res.stderr
    assert os.listdir(tmp_path) == []


def test_a_free_form_mapping_still_takes_plus_keys(tmp_path):
    """``reward.kwargs`` (reward=callable) is any mapping of the callable's arguments: ``+reward.kwargs.scale``
    adds one, the run trains with it and config.yaml keeps it; ``model.features`` (sd3) is a mapping too."""
    (tmp_path / "my_reward.py").write_text(REWARD_FILE)
    res = align_run(*TINY, "train.steps=1", "reward=callable", "reward.target=my_reward.py:Scaled",
                    "reward.differentiable=true", "reward.domain=gmm", "+reward.kwargs.scale=2.5",
                    f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert read_config(str(tmp_path / "run"))["reward"]["kwargs"] == {"scale": 2.5}
    cfg = compose_config(["model=sd3", "reward=aesthetic", "+model.features.dreamsim_type=open_clip_vitb32"],
                         training=False)                # a documented one (align/models/sd3.py)
    assert cfg.model.features.dreamsim_type == "open_clip_vitb32"


def test_a_sweep_file_and_the_base_model_evaluation_refuse_plus_keys(tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"name: t\nout: {tmp_path / 'out'}\ncommon: [model=gmm, reward=linear]\n"
                     "grids:\n  - {+algo.betaa: [3], seed: [0]}\n")
    assert sweep_main([str(sweep), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'algo.betaa' (did you mean algo.beta?)" in err and "Traceback" not in err, err
    res = run_main(evaluate_main, ["model=gmm", "reward=linear", "+reward.scal=5", "--out", str(tmp_path / "ev")])
    assert res.returncode == 2 and _one_line(res.stderr, "align.evaluate: "), res.stderr
    assert "unknown key 'reward.scal' (did you mean reward.scale?)" in res.stderr, res.stderr
    assert sorted(os.listdir(tmp_path)) == ["sweep.yaml"]


# ---- B: paths --------------------------------------------------------------------------------------------------

def test_config_yaml_names_its_files_by_absolute_path(relative_run):
    home, run = relative_run
    saved = read_config(str(run))
    assert saved["prompts"] == f"file:{home / 'pr_ok.txt'}"
    assert saved["reward"]["target"] == f"{home / 'my_reward.py'}:Scaled"


def test_a_run_resumes_from_another_directory(relative_run, tmp_path):
    """The run was trained in its own folder with relative paths; resumed from elsewhere it finds its prompts and
    reward file (in another working directory) and extends to step 3."""
    run_copy = shutil.copytree(relative_run[1], tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = align_run(f"resume={run_copy}", "train.steps=3", cwd=elsewhere)
    assert res.returncode == 0, res.stderr
    assert [r["step"] for r in read_metrics(str(run_copy)) if "eval/reward" in r][-1] == 3
    assert os.listdir(elsewhere) == []


def test_every_path_valued_key_is_made_absolute_and_a_hub_id_is_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(["model=digits", "reward=digits_classifier", "model.weights=w/flow.safetensors",
                          "model.classifier_weights='~/c.safetensors'", "reward.weights=c.safetensors",
                          "eval.rewards=[{name: digits_correct, weights: c2.st}]"], training=False)
    assert cfg.model.weights == str(tmp_path / "w" / "flow.safetensors")
    assert cfg.model.classifier_weights == os.path.expanduser("~/c.safetensors")
    assert cfg.reward.weights == str(tmp_path / "c.safetensors")
    assert cfg.eval.rewards[0].weights == str(tmp_path / "c2.st")
    hub = "stabilityai/stable-diffusion-3-medium-diffusers"
    cfg = compose_config(["model=sd3", "reward=aesthetic", f"model.pretrained={hub}", "model.taesd3_path=taesd",
                          "model.features.weights=feat", "reward.head_weights=./head.pth"], training=False)
    assert cfg.model.pretrained == hub
    assert cfg.model.taesd3_path == str(tmp_path / "taesd")
    assert cfg.model.features.weights == str(tmp_path / "feat")
    assert cfg.reward.head_weights == str(tmp_path / "head.pth")


def test_a_rerun_from_the_same_directory_is_the_same_config(tmp_path, capsys):
    """A sweep with a relative prompts file, its run trained, then planned again from the same folder: skipped,
    not refused as a run of a different config."""
    (tmp_path / "pr_ok.txt").write_text("a point\n")
    sweep = tmp_path / "sweep.yaml"
    common = [*TRAINED, "prompts=file:pr_ok.txt"]
    sweep.write_text(f"name: t\nout: out\ncommon: [{', '.join(common)}]\ngrids:\n  - seed: [0]\n")
    run = [*common, "seed=0", f"run_dir={quote(str(tmp_path / 'out' / 'seed=0'))}"]
    res = align_run(*run, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = run_main(sweep_main, [str(sweep), "--dry-run"], cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("skip   seed=0"), res.stdout + res.stderr
    res = align_run(*run, cwd=tmp_path)                # align.run's own comparison, as a sweep's run makes it
    assert res.returncode == 0 and "already finished, skipping" in res.stdout, res.stdout + res.stderr
    # a config.yaml of a version that kept relative paths: read from the same folder, still the same config
    saved = tmp_path / "out" / "seed=0" / "config.yaml"
    absolute = f"prompts: file:{tmp_path / 'pr_ok.txt'}\n"
    assert absolute in saved.read_text()
    saved.write_text(saved.read_text().replace(absolute, "prompts: file:pr_ok.txt\n"))
    res = run_main(sweep_main, [str(sweep), "--dry-run"], cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("skip   seed=0"), res.stdout + res.stderr
    res = align_run(*run, cwd=tmp_path)
    assert res.returncode == 0 and "already finished, skipping" in res.stdout, res.stdout + res.stderr


def test_evaluate_takes_a_sweep_run_directory_whose_name_holds_equals(run_copy, tmp_path):
    run = shutil.move(run_copy, tmp_path / "algo=vggflow,seed=0")
    res = run_main(evaluate_main, [os.path.relpath(run, tmp_path)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    with open(os.path.join(run, "evaluate", "step_0000002", "metrics.json"), encoding="utf-8") as fh:
        assert json.load(fh)["step"] == 2


# ---- C: one line instead of a traceback ------------------------------------------------------------------------

def test_resuming_a_read_only_run_says_so(run_copy):
    before = _checksums(run_copy)
    with read_only(run_copy):
        res = align_run(f"resume={run_copy}", "train.steps=3")
    assert res.returncode == 2 and _one_line(res.stderr), res.stderr
    assert f"align: resume={run_copy}: {run_copy} is not writable: a resumed run writes" in res.stderr, res.stderr
    assert _checksums(run_copy) == before


def test_evaluating_a_read_only_run_suggests_out(run_copy, tmp_path):
    before = _checksums(run_copy)
    with read_only(run_copy):
        res = run_main(evaluate_main, [str(run_copy)])
        assert res.returncode == 2 and _one_line(res.stderr, "align.evaluate: "), res.stderr
        assert f"{run_copy} is not writable: align.evaluate only reads the run" in res.stderr, res.stderr
        assert "give --out <a writable folder>" in res.stderr, res.stderr
        res = run_main(evaluate_main, [str(run_copy), "--out", str(tmp_path / "out")])
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "metrics.json").exists() and _checksums(run_copy) == before


def _break_yaml(run) -> int:
    """config.yaml with an unclosed '[' on the seed line (as a hand edit leaves it); returns that line (from 1)."""
    path = os.path.join(run, CONFIG_FILE)
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines(keepends=True)
    n = next(i for i, line in enumerate(lines) if line.startswith("seed:"))
    lines[n] = "seed: [0\n"
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(lines)
    return n + 1


def test_a_yaml_error_in_config_yaml_names_the_file_and_the_line(run_copy):
    from align.run import main as run_entry

    line = _break_yaml(run_copy)
    saved = os.path.join(run_copy, CONFIG_FILE)
    for entry, argv, prefix in ((run_entry, [f"resume={run_copy}"], f"align: resume={run_copy}: "),
                                (evaluate_main, [str(run_copy)], "align.evaluate: ")):
        res = run_main(entry, argv)
        assert res.returncode == 2 and _one_line(res.stderr, prefix), res.stderr
        assert f"{saved} is not valid YAML at line " in res.stderr, res.stderr
        assert f"which starts at line {line}); fix it by hand" in res.stderr, res.stderr
    assert not os.path.exists(os.path.join(run_copy, "evaluate"))


SWEEP_FILES = [(b"name: t\ngrids:\n  - {seed: [0]}\n# caf\xe9\n", "is not a UTF-8 text file: line 4 has a byte that is not UTF-8"),
               (b"- name: t\n- grids: []\n", "a sweep file is a mapping with the keys name, out, common, grids; "
                                             "this one is a YAML list"),
               (b"- seed\n- algo\n", "this one is a YAML list"),
               (b"name: t\ncommon: [{model: gmm}]\ngrids:\n  - {seed: [0]}\n", "common must be a list of overrides"),
               (b"name: [t\n", "is not valid YAML at line 2, column 1")]


@pytest.mark.parametrize("content,message", SWEEP_FILES, ids=["latin-1", "list of mappings", "list", "common",
                                                               "syntax"])
def test_an_unreadable_sweep_file_is_one_line(tmp_path, content, message):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_bytes(content)
    res = run_main(sweep_main, [str(sweep), "--dry-run"], cwd=tmp_path)
    assert res.returncode == 2 and _one_line(res.stderr, "align.sweep: "), res.stderr
    assert str(sweep) in res.stderr and message in res.stderr, res.stderr
    assert os.listdir(tmp_path) == ["sweep.yaml"]


def test_a_prompts_file_that_is_a_directory_is_named_as_one(tmp_path):
    (tmp_path / "prompts").mkdir()
    res = align_run(*TINY, "prompts=file:prompts", f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 2 and _one_line(res.stderr), res.stderr
    assert f"prompts=file:{tmp_path / 'prompts'} is a directory, not a text file" in res.stderr, res.stderr
    assert os.listdir(tmp_path) == ["prompts"]
    with pytest.raises(ConfigProblem, match="is a directory, not a text file"):
        compose_config([*TINY, f"prompts=file:{tmp_path}"])
