"""Black-box rewards (digits_correct, gmm_region, jpeg_compressibility): their values against hand computations,
no gradient, and the refusal of an algorithm that differentiates the reward (command line and build_trainer)."""
import io

import numpy as np
import pytest
import torch
from omegaconf import open_dict
from PIL import Image

from align.setup.checks import ConfigError, check_config, gradient_free_algorithms
from align.setup.overrides import ConfigProblem, check_overrides
from align.setup.compose import CONF_DIR, compose_config
from align.core.registry import ALGORITHMS, REWARDS
from helpers.cli import align_run

BLACK_BOX = {"digits_correct": "digits", "gmm_region": "gmm", "jpeg_compressibility": "sd3"}
FIRST_ORDER = ["refl", "draft", "adjoint_matching", "vggflow", "vggflow_pmp"]


def _accepting() -> list[str]:
    """The algorithms that never differentiate the reward, read from the registry here (not from the code under
    test)."""
    return sorted(n for n in ALGORITHMS.names() if ALGORITHMS.get(n).uses_reward_gradient is False)


@pytest.mark.parametrize("name", sorted(BLACK_BOX))
def test_each_domain_ships_a_registered_black_box_reward(name):
    cls = REWARDS.get(name)
    assert cls.differentiable is False and cls.domain == BLACK_BOX[name]
    assert REWARDS.config(name) is not None
    assert gradient_free_algorithms() == _accepting()


def test_digits_correct_is_the_classifiers_argmax_against_the_prompted_class():
    from align.metrics.digits_classifier import DIGIT_NAMES, load_digit_classifier
    from rewards.digits_blackbox import DigitsCorrect

    g = torch.Generator().manual_seed(0)
    images = torch.rand(12, 1, 8, 8, generator=g)
    clf = load_digit_classifier()
    with torch.no_grad():
        predicted = [int(np.argmax(row)) for row in clf(images).numpy()]        # numpy's argmax, row by row
    # half the prompts name the predicted class, half another one: both outcomes occur
    prompts = [DIGIT_NAMES[p if i % 2 == 0 else (p + 3) % 10] for i, p in enumerate(predicted)]
    expected = torch.tensor([1.0 if i % 2 == 0 else 0.0 for i in range(12)])
    reward = DigitsCorrect()
    x = images.clone().requires_grad_(True)
    r = reward(x, prompts)
    assert torch.equal(r, expected) and not r.requires_grad                  # no graph to the images
    # a fixed target scores that class for every prompt; the null prompt "" has no class (0)
    target = predicted[0]
    fixed = DigitsCorrect(target=DIGIT_NAMES[target])(images, [""] * 12)
    assert torch.equal(fixed, torch.tensor([float(p == target) for p in predicted]))
    assert torch.equal(reward(images, [""] * 12), torch.zeros(12))


def test_gmm_region_is_a_step_along_the_direction():
    from rewards.gmm_blackbox import GMMRegion

    c, threshold, scale = [0.6, -0.8], 0.25, 2.0
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.05], [0.2, 0.2], [-3.0, -4.0]])
    by_hand = [scale if c[0] * a + c[1] * b > threshold else 0.0 for a, b in x.tolist()]
    assert by_hand == [2.0, 0.0, 2.0, 0.0, 2.0]                               # both sides of the plane occur
    reward = GMMRegion(direction=c, threshold=threshold, scale=scale)
    r = reward(x.clone().requires_grad_(True))
    assert r.tolist() == by_hand and not r.requires_grad
    assert reward(x.double()).dtype == torch.float64                          # fp64 kept, as the analytic rewards


def _pil_kb(image: torch.Tensor, quality: int) -> float:
    """JPEG size in kB through PIL directly (uint8 HWC, as DDPO converts)."""
    array = np.clip(np.rint(image.numpy().astype(np.float64) * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return len(buf.getvalue()) / 1000.0


def test_jpeg_compressibility_is_minus_the_pil_jpeg_size_in_kb():
    from rewards.compressibility import JpegCompressibility

    g = torch.Generator().manual_seed(0)
    noise = torch.rand(2, 3, 32, 48, generator=g)
    flat = torch.full((1, 3, 32, 48), 0.5)
    images = torch.cat([noise, flat])
    for quality, scale in ((95, 1.0), (50, 0.002)):
        r = JpegCompressibility(quality=quality, scale=scale)(images.clone().requires_grad_(True), ["a"] * 3)
        expected = torch.tensor([-scale * _pil_kb(im, quality) for im in images])
        # the same byte counts; only fp32 rounding of bytes / 1000 · scale differs (< 1e-7 relative)
        assert torch.allclose(r, expected, rtol=1e-6, atol=0) and not r.requires_grad
    r = JpegCompressibility()(images, None)
    assert r[2] > r[0] and r[2] > r[1]                   # a flat image compresses better than noise
    with pytest.raises(ConfigProblem, match="reward.quality must be in 1..100"):
        check_overrides(["reward=jpeg_compressibility", "reward.quality=0", "algo=diffusion_nft"], CONF_DIR)


# ---- the refusal -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", FIRST_ORDER)
def test_a_first_order_algorithm_refuses_a_black_box_reward_on_the_command_line(algo):
    with pytest.raises(ConfigProblem) as err:
        check_overrides([f"algo={algo}", "reward=digits_correct"], CONF_DIR)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1
    assert f"algo={algo}" in msg and "reward=digits_correct" in msg and "not differentiable" in msg
    accepting = _accepting()
    for a in accepting:
        assert f"algo={a}" in msg
    assert accepting or "none is registered yet" in msg


@pytest.mark.parametrize("reward", sorted(BLACK_BOX))
def test_the_gradient_free_algorithms_accept_black_box_rewards(reward):
    if not _accepting():
        pytest.skip("no algorithm without reward gradients is registered yet")
    for algo in _accepting():
        assert check_overrides([f"algo={algo}", f"reward={reward}"], CONF_DIR)[-1] == f"model={BLACK_BOX[reward]}"


def test_the_refusal_from_the_command_line_leaves_no_run_directory(tmp_path):
    res = align_run("algo=refl", "reward=gmm_region", f"run_dir={tmp_path / 'r'}", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and res.stderr.startswith("align: ")
    assert "algo=refl" in res.stderr and "reward=gmm_region" in res.stderr and "not differentiable" in res.stderr
    assert not (tmp_path / "r").exists()


def test_build_trainer_refuses_a_black_box_reward(tmp_path):
    from align.setup.assemble import build_parts, build_trainer

    cfg = compose_config(["algo=refl", "model=gmm", "reward=linear", "train.steps=1"], run_dir=str(tmp_path / "r"))
    with open_dict(cfg):
        cfg.reward = {"name": "gmm_region", "direction": [1.0, 0.0], "threshold": 0.0, "scale": 1.0}
    with pytest.raises(ConfigError, match=r"algo=refl differentiates the reward, but reward=gmm_region is not "):
        build_trainer(cfg, str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()
    # parts built for evaluation (no algorithm runs) are fine; training them is refused by the same check
    parts = build_parts(cfg, training=False)
    assert parts.reward.differentiable is False
    with pytest.raises(ConfigError, match="algo=refl .* reward=gmm_region"):
        check_config(cfg)