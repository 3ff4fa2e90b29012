"""Every algorithm runs through the one trainer: its optimizer groups, clipping, NaN guard and logging."""
import os

import pytest

from align.setup.compose import CONF_DIR, compose_config
from align.core.run_dir import read_metrics
from align.setup.assemble import build_trainer

ALGOS = sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, "algo")) if f.endswith(".yaml"))


@pytest.mark.parametrize("algo", ALGOS)
def test_algorithm_trains_through_the_shared_trainer(tmp_path, algo):
    run_dir = str(tmp_path / "run")
    cfg = compose_config([f"algo={algo}", "reward=linear", "train.steps=2", "train.batch_size=4",
                          "train.progress=false", "eval.n_samples=16", "eval.final_samples=4"], run_dir=run_dir)
    trainer = build_trainer(cfg, run_dir)
    group_names = [g["name"] for g in trainer.groups]
    assert group_names[0] == "theta"
    assert len(trainer.optimizer.param_groups) == len(group_names)
    trainer.train()
    rows = read_metrics(run_dir)
    for name in group_names:                       # per-group clipping happened in the trainer
        assert f"grad_norm/{name}" in rows[1]
    assert rows[-1]["step"] == 2 and "eval/reward" in rows[-1]
    assert {"reward_mean", "loss", "skipped"} <= set(rows[1])
    # the model's finetuned part moved, through the shared optimizer
    import torch
    ckpt = torch.load(os.path.join(run_dir, "checkpoints", "step_0000002", "state.pt"), weights_only=False)
    assert any(v.abs().sum() > 0 for k, v in ckpt["model"].items() if "out" in k)
