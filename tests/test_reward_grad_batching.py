"""``model.reward_grad_batch_size``: ∇r(decode(x)) n images at a time (algorithms/common/reward_grad.py), on a
tiny FLUX pipeline with its VAE. The gradient is the whole batch's (the rewards score each image independently), only one pass's
decode-and-reward graph is alive at a time (counted through autograd's saved-tensor hooks, not timed), and a
VGG-Flow run is the same with it as without."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from align.core.interfaces import Reward
from algorithms.common.reward_grad import reward_and_grad
from helpers.saved_bytes import AliveSavedBytes, storages
from helpers.tiny_flux import RESOLUTION, build_tiny_flux, load_flux
from helpers.tiny_sd3 import tiny_reward_registered as _tiny_reward_registered

PROMPTS = ["a photo of a cat", "a dog in the snow", "a red car", "two birds"]


class SquaredPoolReward(Reward):
    """A nonlinear per-image score, Σ w · pool(x)² (tests only)."""

    name, domain = "sd3_test_squared_pool", "sd3"

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1.0, 1.0, 48), requires_grad=False)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (F.adaptive_avg_pool2d(images.float(), 4).flatten(1).pow(2) * self.w).sum(1)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> str:
    return build_tiny_flux(str(tmp_path_factory.mktemp("tiny_flux")))


@pytest.fixture(scope="module")
def model(flux_dir):
    return load_flux(flux_dir)


def _x(model, n: int = 4) -> torch.Tensor:
    return model.sample_noise(n, torch.Generator().manual_seed(3))


@pytest.mark.parametrize("n", [1, 3])
def test_chunked_reward_gradients_equal_the_whole_batch_s(model, n):
    reward, x = SquaredPoolReward(), _x(model)
    model.reward_grad_batch_size = None
    r_all, g_all = reward_and_grad(model, reward, x, PROMPTS)
    model.reward_grad_batch_size = n
    try:
        r, g = reward_and_grad(model, reward, x, PROMPTS)
    finally:
        model.reward_grad_batch_size = None
    assert g.shape == x.shape and g_all.abs().sum() > 0
    torch.testing.assert_close(r, r_all, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g, g_all, atol=1e-6, rtol=1e-5)
    # and each row is that image's own gradient: one image alone gives it
    model.reward_grad_batch_size = None
    _, g1 = reward_and_grad(model, reward, x[2:3], PROMPTS[2:3])
    torch.testing.assert_close(g[2:3], g1, atol=1e-6, rtol=1e-5)


def _peak_saved_bytes(model, reward, x, n) -> int:
    counter = AliveSavedBytes(storages(model, reward))
    model.reward_grad_batch_size = n
    try:
        with counter.counting():
            reward_and_grad(model, reward, x, PROMPTS)
    finally:
        model.reward_grad_batch_size = None
    assert counter.alive == 0                      # every graph was freed
    return counter.peak


def test_only_one_pass_s_graph_is_alive_at_a_time(model):
    reward, x = SquaredPoolReward(), _x(model)
    whole, one, two = (_peak_saved_bytes(model, reward, x, n) for n in (None, 1, 2))
    assert whole > 0
    assert one * 4 == pytest.approx(whole, rel=0.02)     # everything saved is per image: a quarter of the batch's
    assert two * 2 == pytest.approx(whole, rel=0.02)


@pytest.fixture
def tiny_reward_registered():
    with _tiny_reward_registered() as name:
        yield name


def test_a_vggflow_run_is_the_same_with_one_image_per_pass(flux_dir, tmp_path, tiny_reward_registered):
    """Two updates in float64 with AdamW linear in the gradient (tests/helpers/fp64.py: the parameters after the
    updates are compared; in float32 the per-image and batched decodes round differently and Adam's default 1/ε
    amplifies that without bound)."""
    from omegaconf import open_dict

    from align.setup.compose import compose_config
    from helpers.fp64 import ATOL, LINEAR_ADAM, assert_same_parameters, build_linear_fp64_trainer

    finals = []
    for n in ("null", "1"):
        run_dir = str(tmp_path / f"run_{n}")
        cfg = compose_config([
            "algo=vggflow", "model=flux", "reward=aesthetic", f"model.pretrained={flux_dir}", "model.dtype=float32",
            f"model.resolution={RESOLUTION}", "model.max_sequence_length=16", "model.decoder=vae",
            f"model.reward_grad_batch_size={n}", "model.features.kind=pixels",
            "model.value_net.block_out_channels=[8,16]", "model.value_net.attention_head_dim=4", "prompts=hpdv2",
            "sampler.steps=4", "algo.subsample_bins=2", "train.steps=2", "train.batch_size=2",
            "train.progress=false", "eval.every=0", "eval.n_samples=2", "eval.group_size=2",
            "eval.final_samples=2", "device=cpu", LINEAR_ADAM], run_dir=run_dir)
        with open_dict(cfg):
            cfg.reward = {"name": tiny_reward_registered}
        trainer = build_linear_fp64_trainer(cfg, run_dir)
        assert trainer.model.reward_grad_batch_size == (None if n == "null" else 1)
        if not finals:
            before = {k: v.clone() for k, v in trainer.model.finetune_state_dict().items()}
        trainer.train()
        finals.append((trainer.model.finetune_state_dict(), trainer.algo.state_dict()))
    moved = max((v - before[k]).abs().max().item() for k, v in finals[0][0].items())
    assert moved > 1e4 * ATOL, moved                      # not vacuous
    for a, b in zip(*finals):
        assert_same_parameters(a, b)
