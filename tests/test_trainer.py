"""The trainer's contract: exact resume, the NaN guard, atomic checkpoints, the run directory."""
import json
import os

import pytest
import torch

from align.setup.compose import compose_config
from align.core.run_dir import list_checkpoints, read_metrics
from align.setup.assemble import build_trainer
from align.train.trainer import Trainer, TrainingDiverged

FAST = ["model=gmm", "reward=linear", "train.steps=6", "train.batch_size=8", "train.checkpoint_every=2", "eval.every=3", "eval.n_samples=32",
        "eval.final_samples=16", "train.progress=false"]


def _rows(run_dir):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in read_metrics(run_dir)]


@pytest.mark.parametrize("algo", ["vggflow"])
def test_interrupted_and_resumed_run_writes_the_same_rows(tmp_path, algo, monkeypatch):
    full = str(tmp_path / "full")
    build_trainer(compose_config(FAST + [f"algo={algo}"], run_dir=full), full).train()

    part = str(tmp_path / "part")
    cfg = compose_config(FAST + [f"algo={algo}"], run_dir=part)
    original = Trainer.update
    calls = {"n": 0}

    def crashing_update(self):
        calls["n"] += 1
        if calls["n"] == 5:                     # dies during step 5; the last checkpoint is step 4
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "update", crashing_update)
    with pytest.raises(KeyboardInterrupt):
        build_trainer(cfg, part).train()
    monkeypatch.setattr(Trainer, "update", original)
    assert list_checkpoints(part) == [2, 4]
    assert not os.path.exists(os.path.join(part, "samples_final.pt"))

    resumed = compose_config(FAST + [f"algo={algo}", f"resume={part}"], run_dir=part)
    build_trainer(resumed, part).train()
    assert _rows(part) == _rows(full)
    a = torch.load(os.path.join(full, "samples_final.pt"))
    b = torch.load(os.path.join(part, "samples_final.pt"))
    assert torch.equal(a["x1"], b["x1"])


def test_run_directory_contract(tmp_path):
    run_dir = str(tmp_path / "run")
    build_trainer(compose_config(FAST, run_dir=run_dir), run_dir).train()
    assert os.path.isfile(os.path.join(run_dir, "config.yaml"))
    assert os.listdir(os.path.join(run_dir, "tb"))
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(7))
    assert {"eval/reward", "eval/diversity", "eval/fid"} <= set(rows[0]) and "eval/reward" in rows[3]
    assert {"reward_mean", "reward_std", "loss", "time_s", "grad_norm/theta", "grad_norm/phi"} <= set(rows[1])
    assert rows[0]["eval/fid"] < 1e-6                       # the untouched model equals the base
    samples = torch.load(os.path.join(run_dir, "samples_final.pt"))
    assert samples["x1"].shape == (16, 2) and len(samples["prompts"]) == 16
    assert list_checkpoints(run_dir) == [2, 4, 6]            # keep_checkpoints=3
    ckpt = os.path.join(run_dir, "checkpoints", "step_0000006")
    assert os.path.isfile(os.path.join(ckpt, "state.pt"))
    assert os.listdir(os.path.join(ckpt, "finetuned"))
    assert not [n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.startswith(".tmp")]
    pngs = sorted(os.listdir(os.path.join(run_dir, "samples")))   # eval at 0, 3, 6 (eval.every=3)
    assert pngs == ["latest.png", "step_0000000.png", "step_0000003.png", "step_0000006.png"]
    with open(os.path.join(run_dir, "samples", "latest.png"), "rb") as a, \
            open(os.path.join(run_dir, "samples", "step_0000006.png"), "rb") as b:
        assert a.read() == b.read() and os.path.getsize(os.path.join(run_dir, "samples", "latest.png")) > 1000


def test_preview_order_takes_each_prompt_in_turn():
    from align.train.trainer import preview_order

    prompts = ["zero"] * 3 + ["one"] * 3 + ["zero"] * 2
    assert preview_order(prompts, per_prompt=2) == [0, 1, 3, 4]
    assert preview_order(["", "", ""]) == [0, 1, 2]


def test_non_finite_updates_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch):
    from algorithms.vggflow import VGGFlow

    run_dir = str(tmp_path / "run")
    cfg = compose_config(FAST + ["train.max_bad_steps=3", "train.steps=10"], run_dir=run_dir)
    trainer = build_trainer(cfg, run_dir)
    before = {k: v.clone() for k, v in trainer.model.finetune_state_dict().items()}
    original = VGGFlow.loss

    def nan_after_two(self, traj, gen):
        loss, logs = original(self, traj, gen)
        return (loss * float("nan") if trainer.step >= 2 else loss), logs

    monkeypatch.setattr(VGGFlow, "loss", nan_after_two)
    with pytest.raises(TrainingDiverged, match="3 consecutive"):
        trainer.train()
    rows = read_metrics(run_dir)
    assert [r["skipped"] for r in rows[1:]] == [0, 0, 1, 1, 1]
    assert rows[-1]["skipped_total"] == 3                   # the third bad step is logged, then the run stops
    assert list_checkpoints(run_dir) == [2, 4, 5]
    state = torch.load(os.path.join(run_dir, "checkpoints", "step_0000005", "state.pt"), weights_only=False)
    after_two = torch.load(os.path.join(run_dir, "checkpoints", "step_0000002", "state.pt"), weights_only=False)
    for k, v in state["model"].items():                     # skipped updates left the parameters alone
        assert torch.equal(v, after_two["model"][k]) and torch.isfinite(v).all()
    assert any(not torch.equal(before[k], after_two["model"][k]) for k in before)


def test_metrics_are_json_lines(tmp_path):
    run_dir = str(tmp_path / "run")
    build_trainer(compose_config(FAST + ["train.steps=2"], run_dir=run_dir), run_dir).train()
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        for line in fh:
            assert isinstance(json.loads(line), dict)


def test_parameters_blown_up_by_finite_updates_stop_the_run_and_are_never_checkpointed(tmp_path):
    """lr = 1e6 (finite loss and gradients): the first update multiplies ‖θ‖ by ~10⁶; the run stops there, logs
    that row, and no checkpoint holds the broken parameters."""
    run_dir = str(tmp_path / "run")
    cfg = compose_config(FAST + ["algo=refl", "train.lr=1e6", "train.checkpoint_every=1", "train.steps=4"],
                         run_dir=run_dir)
    trainer = build_trainer(cfg, run_dir)
    start = trainer.start_norms["theta"]
    original = Trainer.update
    calls = {"n": 0}

    def blow_up_at_step_3(self):                   # two ordinary updates (lr 1e-4), then lr 1e6
        calls["n"] += 1
        for g in self.optimizer.param_groups:
            g["lr"] = 1e6 if calls["n"] == 3 else 1e-4
        return original(self)

    Trainer.update = blow_up_at_step_3
    try:
        with pytest.raises(TrainingDiverged, match=r"step 3 left the parameters of theta .*newest checkpoint "
                                                   r"\(step 2\)"):
            trainer.train()
    finally:
        Trainer.update = original
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and rows[-1]["param_norm/theta"] > 100 * start
    assert list_checkpoints(run_dir) == [1, 2]
    kept = torch.load(os.path.join(run_dir, "checkpoints", "step_0000002", "state.pt"), weights_only=False)
    norm = torch.cat([v.flatten() for v in kept["model"].values()]).norm()
    assert norm < 2 * start and kept["start_norms"]["theta"] == start
