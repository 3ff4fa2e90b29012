"""Every bad value is refused before any work: exit code 2, one message naming the key or the
file, no traceback, no run directory left behind, no file of the user's touched. The cases go through
``align.run.main`` in this process (tests/helpers/cli.py; tests/test_cli.py runs a real ``python -m align.run``),
and ``align.sweep --dry-run`` applies the same checks to every run."""
import hashlib
import os

import pytest
import torch

from align.metrics.digits_classifier import WEIGHTS_DIR
from align.run import main as run_main
from align.sweep import main as sweep_main
from helpers.cli import align_run
GMM = ["model=gmm", "reward=linear"]

# (overrides, substrings of the message); {tmp} is the test's folder, whose files are the user's
CATALOGUE = [
    (["train.grad_clip=0"], ["train.grad_clip", "> 0"]),
    (["model=flux", "reward=hpsv2", "model.reward_grad_batch_size=0"],
     ["model.reward_grad_batch_size must be >= 1", "0"]),
    (["model=sd3", "reward=aesthetic", "model.reward_grad_batch_size=-2"], ["model.reward_grad_batch_size", "-2"]),
    (["train.grad_clip=-1"], ["train.grad_clip", "> 0", "-1"]),
    (["train.checkpoint_every=0"], ["train.checkpoint_every must be >= 1"]),
    (["train.log_every=0"], ["train.log_every must be >= 1"]),
    (["train.max_bad_steps=0"], ["train.max_bad_steps must be >= 1"]),
    (["train.collective_timeout_s=0"], ["train.collective_timeout_s must be finite and > 0", "0"]),
    (["eval.batch_size=0"], ["eval.batch_size must be >= 1", "0"]),
    (["algo=refl", "sampler.steps=3"], ["algo.truncation=[15, 20)", "3-step grid", "sampler.steps"]),
    (["algo=vggflow", "algo.subsample_bins=30"], ["algo.subsample_bins must be in [1, sampler.steps=20]", "30"]),
    (["algo=vggflow_pmp", "sampler.steps=4"], ["algo.subsample_bins must be in [1, sampler.steps=4]", "5"]),
    (["threads=-1"], ["threads must be >= 1", "-1"]),
    (["algo.beta=[1,2]"], ["algo.beta", "[1, 2]"]),
    (["algo.beta=nan"], ["algo.beta must be finite and > 0", "nan"]),
    (["algo=adjoint_matching", "algo.beta=inf"], ["algo.beta must be finite and > 0", "inf"]),
    (["train.steps=abc"], ["train.steps", "abc"]),
    (["train.lr=-1"], ["train.lr", "-1"]),
    (["eval.every=-1"], ["eval.every must be >= 0"]),
    (["model=digits", "prompts=animals"], ["prompts=animals", "digits", "cat"]),
    (["model=digits", "prompts=file:{tmp}/binary.txt"], ["prompts=file:{tmp}/binary.txt", "not a text file"]),
    (["prompts=file:{tmp}/absent.txt"], ["prompts=file:{tmp}/absent.txt", "no such file"]),
    (["reward=aesthetic", "model=digits"], ["reward=aesthetic scores the 'sd3' domain but model=digits"]),
    (["run_dir={tmp}/user.txt"], ["run_dir={tmp}/user.txt is a file"]),
    (["run_dir={tmp}/user.txt/run"], ["run_dir={tmp}/user.txt/run cannot be created", "is a file"]),
    (["run_dir=/proc/align_run"], ["run_dir=/proc/align_run", "not writable"]),
]
if not torch.cuda.is_available():
    CATALOGUE.append((["device=cuda"], ["device=cuda", "no GPU"]))


@pytest.fixture
def user_files(tmp_path):
    """The user's files in the test folder, and a function telling whether any of them changed."""
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "user.txt").write_text("the user's notes\n")

    def snapshot():
        return {p: hashlib.sha256(open(tmp_path / p, "rb").read()).hexdigest() for p in sorted(os.listdir(tmp_path))}

    before = snapshot()
    return lambda: snapshot() == before


def _fill(items, tmp):
    return [s.replace("{tmp}", str(tmp)) for s in items]


def _refused(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        run_main(argv)
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize("overrides,needles", CATALOGUE, ids=[" ".join(o) for o, _ in CATALOGUE])
def test_a_bad_value_is_refused_before_any_work(tmp_path, capsys, user_files, overrides, needles):
    overrides = _fill(overrides, tmp_path)
    run_dir = [] if any(o.startswith("run_dir=") for o in overrides) else [f"run_dir={tmp_path / 'run'}"]
    code, err = _refused(capsys, overrides + run_dir)
    assert code == 2, err
    assert err.startswith("align: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert all(n in err for n in _fill(needles, tmp_path)), err
    assert sorted(os.listdir(tmp_path)) == ["binary.txt", "user.txt"] and user_files()


def _garbage_weights(tmp_path, name: str, json_beside: bool) -> str:
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(os.urandom(300))
    if json_beside:     # the architecture beside the flow's weights, so that the weights themselves are read
        (tmp_path / f"{name}.json").write_bytes(open(os.path.join(WEIGHTS_DIR, "digits_flow.json"), "rb").read())
    return str(path)


@pytest.mark.parametrize("key", ["model.weights", "model.classifier_weights"])
def test_a_garbage_weights_file_names_the_file_and_the_key(tmp_path, key):
    weights = _garbage_weights(tmp_path, "garbage", json_beside=key == "model.weights")
    before = sorted(os.listdir(tmp_path))
    res = align_run("model=digits", f"{key}={weights}", f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and f"{weights} is not a readable safetensors file" in res.stderr
    assert f"`{key}=<path>`" in res.stderr, res.stderr
    assert sorted(os.listdir(tmp_path)) == before


def test_the_real_command_line_refuses_with_one_line(tmp_path):
    res = align_run(*GMM, "train.log_every=0", f"run_dir={tmp_path / 'r'}", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr == "align: train.log_every must be >= 1, got 0\n", res.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad", ["train.lr=-1", "train.grad_clip=0", "algo.beta=nan"])
def test_a_sweep_dry_run_applies_the_same_checks_to_every_run(tmp_path, capsys, bad):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"name: t\nout: {tmp_path / 'out'}\ncommon: [{', '.join(GMM)}]\ngrids:\n  - seed: [0, 1]\n")
    assert sweep_main([str(sweep), bad, "--dry-run"]) == 2
    err = capsys.readouterr().err
    key = bad.partition("=")[0]
    assert "2 of 2 runs cannot start" in err and err.count(key) == 2 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
