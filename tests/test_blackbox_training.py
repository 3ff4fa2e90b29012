"""Black-box rewards train the gradient-free algorithms: Flow-GRPO on digits_correct (0/1 from the classifier's
argmax), DiffusionNFT on gmm_region (a step in cᵀx) and Flow-GRPO on a user's callable; the rewards are never
differentiated, the parameters move, and a callable's domain survives a resume."""
import os
import textwrap

import pytest
import torch

from align.setup.assemble import build_trainer
from align.setup.compose import compose_config
from align.core.run_dir import read_metrics
from align.core.schema import typed_config

SMALL = ["train.steps=2", "train.batch_size=4", "train.progress=false", "eval.every=0", "eval.n_samples=8",
         "eval.group_size=4", "eval.final_samples=4", "algo.group_size=2"]


def _train(overrides, run_dir):
    cfg = compose_config(overrides + SMALL, run_dir=run_dir)
    trainer = build_trainer(cfg, run_dir)
    seen_grad = []
    forward = trainer.reward.forward

    def spy(images, *a, **k):                      # what the algorithm hands the reward
        seen_grad.append(images.requires_grad)
        return forward(images, *a, **k)

    trainer.reward.forward = spy
    before = [p.detach().clone() for p in trainer.model.trainable_parameters()]
    trainer.train()
    moved = sum((p.detach() - b).abs().sum().item() for p, b in zip(trainer.model.trainable_parameters(), before))
    return read_metrics(run_dir), seen_grad, moved, cfg


@pytest.mark.parametrize("algo, reward, model", [("flow_grpo", "digits_correct", "digits"),
                                                 ("diffusion_nft", "gmm_region", "gmm")])
def test_a_gradient_free_algorithm_trains_on_a_black_box_reward(tmp_path, algo, reward, model):
    extra = ["algo.train_steps=4"] if algo == "flow_grpo" else ["reward.threshold=0.0"]
    rows, seen_grad, moved, _ = _train([f"algo={algo}", f"reward={reward}", f"model={model}"] + extra,
                                       str(tmp_path / "run"))
    assert rows[-1]["step"] == 2 and "eval/reward" in rows[-1]
    assert seen_grad and not any(seen_grad)        # the reward never sees an input that requires grad
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows[1:])
    if reward == "digits_correct":                 # a 0/1 score: its evaluation mean is a fraction
        assert 0.0 <= rows[-1]["eval/reward"] <= 1.0
    assert moved > 0                               # the two gmm modes sit either side of the step at cᵀx = 0


def test_a_callable_reward_trains_flow_grpo_and_keeps_its_domain_on_resume(tmp_path):
    user = tmp_path / "my_rewards.py"
    user.write_text(textwrap.dedent('''
        def first_coordinate(images, prompts):
            return [float(v) for v in images[:, 0]]
    '''))
    run_dir = str(tmp_path / "run")
    rows, seen_grad, moved, cfg = _train(["algo=flow_grpo", "algo.train_steps=4", "reward=callable",
                                          f"reward.target={user}:first_coordinate", "reward.domain=gmm",
                                          "model=gmm"], run_dir)
    assert rows[-1]["step"] == 2 and moved > 0 and not any(seen_grad)
    from omegaconf import OmegaConf
    saved = OmegaConf.load(os.path.join(run_dir, "config.yaml"))
    assert typed_config(saved).reward.domain == "gmm"   # not dropped as the built-ins' retired reward.domain
