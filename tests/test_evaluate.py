"""``python -m align.evaluate``: a run's checkpoint evaluated again equals that run's eval row of
the same step, the base model's evaluation equals a run's step-0 row, ``--samples K`` writes samples_final.pt's
format (at the last step: the run's own final samples), and the run directory is only read."""
import json
import os

import pytest
import torch

from align.setup.assemble import build_trainer
from align.setup.compose import compose_config
from align.evaluate import main as evaluate_main
from align.core.run_dir import CHECKPOINTS_DIR, FINISHED_FILE, METRICS_FILE, hold_run_dir, read_metrics

SETTINGS = ["model=gmm", "reward=linear", "eval.n_samples=16", "eval.final_samples=8", "seed=3"]
RUN = SETTINGS + ["train.steps=4", "train.batch_size=4", "train.checkpoint_every=2", "eval.every=2",
                  "train.progress=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny trained gmm run: eval rows and checkpoints at steps 2 and 4."""
    run_dir = str(tmp_path_factory.mktemp("evaluate") / "run")
    build_trainer(compose_config(RUN, run_dir=run_dir), run_dir).train()
    return run_dir


def _eval_row(run_dir: str, step: int) -> dict:
    row = next(r for r in read_metrics(run_dir) if r["step"] == step and "eval/reward" in r)
    return {k: v for k, v in row.items() if k.startswith("eval/")}


def _written(out) -> dict:
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as fh:
        return json.load(fh)


def _untouched(run_dir: str):
    """A function telling whether metrics.jsonl and the checkpoints are as they are now."""
    def state():
        with open(os.path.join(run_dir, METRICS_FILE), "rb") as fh:
            return fh.read(), sorted(os.listdir(os.path.join(run_dir, CHECKPOINTS_DIR)))
    before = state()
    return lambda: state() == before


@pytest.mark.parametrize("step", [2, None])
def test_a_checkpoint_evaluates_to_its_eval_row(run, step):
    untouched = _untouched(run)
    with hold_run_dir(run):            # read-only: a run holding the lock does not stop it
        assert evaluate_main([run] + ([] if step is None else ["--step", str(step)])) == 0
    out = os.path.join(run, "evaluate", f"step_{step or 4:07d}")
    written = _written(out)
    assert written.pop("step") == (step or 4)
    assert written == _eval_row(run, step or 4)
    assert os.path.isfile(os.path.join(out, "samples.png")) and untouched()


def test_the_base_model_evaluates_to_a_runs_step_0_row(run, tmp_path):
    assert evaluate_main(SETTINGS + ["--out", str(tmp_path / "base")]) == 0
    written = _written(tmp_path / "base")
    assert written.pop("step") == 0 and written == _eval_row(run, 0)


def test_samples_are_written_in_the_final_samples_format(run, tmp_path):
    assert evaluate_main([run, "--samples", "8", "--out", str(tmp_path / "end")]) == 0
    samples, final = (torch.load(p) for p in (tmp_path / "end" / "samples.pt", os.path.join(run, FINISHED_FILE)))
    assert samples.keys() == final.keys() and len(samples["x1"]) == 8
    assert torch.equal(samples["x1"], final["x1"]) and samples["prompts"] == final["prompts"]
    assert evaluate_main([run, "--step", "2", "--samples", "3", "--out", str(tmp_path / "three")]) == 0
    assert len(torch.load(tmp_path / "three" / "samples.pt")["x1"]) == 3


def test_bad_arguments_are_one_line(run, capsys):
    assert evaluate_main([run, "--step", "3"]) == 2
    assert capsys.readouterr().err == (f"align.evaluate: --step 3: {run} has no checkpoint of that step; "
                                       "it has 2, 4\n")
    assert evaluate_main(["model=gmm", "train.grad_clip=0"]) == 2
    assert "train.grad_clip must be finite and > 0" in capsys.readouterr().err
