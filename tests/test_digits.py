"""The built-in image domain: the SD3-convention backend code, the shipped digits checkpoint and its rewards."""
from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from align.setup.compose import compose_config
from align.metrics.digits_classifier import (CLASSIFIER_WEIGHTS, DIGIT_NAMES, REGENERATE, load_digit_classifier,
                                             prompt_to_class)
from align.metrics.paper_metrics import feature_diversity, frechet_distance
from align.models.digits import FLOW_CONFIG, FLOW_WEIGHTS, DigitsFlow
from align.models.flow_transformer import (LORA_WEIGHT_NAME, cfg_combine, lora_parameters, sigma_to_t,
                                           t_to_sigma, u_to_v, v_to_u)
from align.setup.paper_settings import TABLE
from align.core.registry import MODELS, REWARDS
from algorithms.common.reward_grad import reward_and_grad
from samplers import euler_integrate, make_grid, one_step_prediction

HAVE_WEIGHTS = os.path.isfile(FLOW_WEIGHTS) and os.path.isfile(CLASSIFIER_WEIGHTS)
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason=f"digits weights missing; run `{REGENERATE}`")


def _model(**kw) -> DigitsFlow:
    torch.manual_seed(0)
    return DigitsFlow(**kw) if HAVE_WEIGHTS else DigitsFlow(pretrained=False, **kw)


def _perturb_lora(model: DigitsFlow, scale: float = 0.1, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def _inputs(model: DigitsFlow, n: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = model.sample_noise(n, gen)
    t = torch.rand(n, generator=gen)
    prompts = [DIGIT_NAMES[i % 10] for i in range(n)]
    return x, t, prompts, model.encode(prompts)


def _sample(model: DigitsFlow, velocity, prompts, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    cond = model.encode(prompts)
    x0 = model.sample_noise(len(prompts), gen)
    return euler_integrate(lambda x, t: velocity(x, t, cond), x0, make_grid("sd3", 20), record=False)


# ---- the checkpoint --------------------------------------------------------------------------------------
@needs_weights
def test_checkpoint_reproduces_shipped_statistics():
    """Loading the shipped weights and sampling the fixed-seed fixture gives the statistics stored at pretraining."""
    from align.pretrain import sample_stats

    with open(FLOW_CONFIG, encoding="utf-8") as fh:
        stats = json.load(fh)["stats"]
    fixture = stats["test_fixture"]
    model = DigitsFlow()
    got = sample_stats(model, fixture["n"] // 10, fixture["guidance_scale"], fixture["grid"], fixture["steps"],
                       fixture["seed"])
    assert got["mean_pixel"] == pytest.approx(fixture["mean_pixel"], abs=2e-3)
    assert got["accuracy"] == pytest.approx(fixture["accuracy"], abs=0.051)
    assert stats["generated_1000"]["accuracy"] >= 0.9


def test_missing_weights_error_names_file_and_command(tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError) as err:
        DigitsFlow(weights=missing)
    assert missing in str(err.value) and REGENERATE in str(err.value)
    with pytest.raises(FileNotFoundError, match="align.pretrain"):
        load_digit_classifier(str(tmp_path / "clf.safetensors"))


def test_prompts_and_registry():
    assert MODELS.get("digits") is DigitsFlow
    assert [prompt_to_class(p) for p in ("three", "3", "a handwritten digit 3", "")] == [3, 3, 3, 10]
    with pytest.raises(ValueError, match="zero"):
        prompt_to_class("a cat")
    for name in ("digits_thickness", "digits_classifier", "digits_symmetry"):
        assert REWARDS.get(name).domain == "digits"
        cfg = compose_config([f"reward={name}"])                  # the reward's domain picks the model
        assert cfg.reward.name == name and cfg.model.name == "digits"
    assert compose_config(["model=digits"]).model.grid == "sd3"   # the domain's β / α: align/setup/paper_settings.py
    vggflow, adjoint_matching = (TABLE[("digits", "*", algo)] for algo in ("vggflow", "adjoint_matching"))
    assert {"beta", "alpha"} <= set(vggflow) and "beta" in adjoint_matching


# ---- LoRA, base velocity and CFG --------------------------------------------------------------------------
def test_trainable_parameters_are_the_lora_weights_only():
    model = _model()
    trainable = model.trainable_parameters()
    assert trainable and all(p.requires_grad for p in trainable)
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(model.transformer)}
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert frozen == []
    n_layers = model.config["transformer"]["num_layers"]
    assert len(trainable) == n_layers * 4 * 2          # to_q, to_k, to_v, to_out.0 × (lora_A, lora_B)


def test_lora_disabled_gives_exactly_the_base_velocity():
    model = _model()
    x, t, _, cond = _inputs(model)
    with torch.no_grad():
        base0 = model.base_velocity(x, t, cond)
        assert torch.equal(model.velocity(x, t, cond), base0)       # gaussian init: B = 0
        _perturb_lora(model)
        base1 = model.base_velocity(x, t, cond)
        v1 = model.velocity(x, t, cond)
    assert torch.equal(base0, base1)
    assert (v1 - base1).abs().max() > 1e-3
    assert all(p.requires_grad for p in model.trainable_parameters())   # flags restored after disabling


def test_base_velocity_differentiable_in_x_without_parameter_grads():
    model = _model()
    _perturb_lora(model)
    x, t, _, cond = _inputs(model)
    x = x.clone().requires_grad_(True)
    model.base_velocity(x, t, cond).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    assert all(p.grad is None for p in model.parameters())


def test_cfg_scale_one_is_the_conditional_velocity_and_uncond_is_detached():
    model = _model()
    _perturb_lora(model)
    x, t, _, cond = _inputs(model)
    with torch.no_grad():
        v1 = model.velocity(x, t, cond, guidance_scale=1.0)
        v_cond = u_to_v(model.transformer_u(x, t_to_sigma(t), cond))
        v_unc = u_to_v(model.transformer_u(x, t_to_sigma(t), model.negative_cond(len(x))))
        v3 = model.velocity(x, t, cond, guidance_scale=3.0)
    torch.testing.assert_close(v1, v_cond)
    torch.testing.assert_close(v3, cfg_combine(v_cond, v_unc, 3.0), atol=1e-5, rtol=1e-5)
    # Under grad: same value, and the θ-gradient is w times that of the conditional branch only.
    params = model.trainable_parameters()
    v3g = model.velocity(x, t, cond, guidance_scale=3.0)
    torch.testing.assert_close(v3g.detach(), v3, atol=1e-5, rtol=1e-5)
    g_cfg = torch.autograd.grad(v3g.sum(), params)
    g_cond = torch.autograd.grad(u_to_v(model.transformer_u(x, t_to_sigma(t), cond)).sum(), params)
    for a, b in zip(g_cfg, g_cond):
        torch.testing.assert_close(a, 3.0 * b, atol=1e-5, rtol=1e-4)


# ---- the convention ---------------------------------------------------------------------------------------
finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=50, deadline=None)
@given(t=st.floats(0.0, 1.0, width=32), v=st.lists(finite, min_size=1, max_size=8))
def test_convention_round_trips(t, v):
    tt = torch.tensor([t])
    vv = torch.tensor(v)
    torch.testing.assert_close(sigma_to_t(t_to_sigma(tt)), tt, atol=1e-6, rtol=0)
    assert torch.equal(u_to_v(v_to_u(vv)), vv) and torch.equal(v_to_u(u_to_v(vv)), vv)
    # One-step prediction agrees in both conventions: x_t + (1 − t) v = x_σ − σ u.
    x = torch.ones_like(vv)
    torch.testing.assert_close(one_step_prediction(x, tt, vv), x - t_to_sigma(tt) * v_to_u(vv), atol=1e-3, rtol=1e-5)


def test_euler_step_matches_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = _model()
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(20)
    ts = make_grid("sd3", 20)
    torch.testing.assert_close(sigma_to_t(sched.sigmas.double()), ts, atol=1e-6, rtol=0)
    x, _, _, cond = _inputs(model)
    for k in (0, 7, 19):
        t = torch.full((len(x),), float(ts[k]))
        with torch.no_grad():
            u = model.guided_u(x, t_to_sigma(t), cond)
            ours = x + float(ts[k + 1] - ts[k]) * model.velocity(x, t, cond)
        sched._step_index = k
        theirs = sched.step(u, sched.timesteps[k], x, return_dict=False)[0]
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# ---- rewards ----------------------------------------------------------------------------------------------
@needs_weights
@pytest.mark.parametrize("name", ["digits_thickness", "digits_classifier", "digits_symmetry"])
def test_reward_gradients_reach_pixels_and_lora(name):
    model = _model()
    _perturb_lora(model, 0.05)
    reward = REWARDS.get(name)()
    x, _, prompts, cond = _inputs(model, n=4)
    t = torch.full((4,), 0.6)
    r, grad_x = reward_and_grad(model, reward, one_step_prediction(x, t, model.velocity(x, t, cond).detach()),
                                prompts)
    assert r.shape == (4,) and torch.isfinite(r).all()
    assert torch.isfinite(grad_x).all() and grad_x.abs().sum() > 0
    x1 = one_step_prediction(x, t, model.velocity(x, t, cond))
    reward(model.decode(x1), prompts).sum().backward()
    grads = [p.grad for p in model.trainable_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@needs_weights
def test_classifier_reward_prefers_the_prompted_class():
    model = _model()
    reward = REWARDS.get("digits_classifier")()
    x1 = _sample(model, model.base_velocity, ["three"] * 8, seed=3)
    right = reward(model.decode(x1), ["three"] * 8)
    wrong = reward(model.decode(x1), ["seven"] * 8)
    assert right.mean() > -0.5 and (right > wrong).all()


# ---- metrics on this domain -------------------------------------------------------------------------------
@needs_weights
def test_fid_same_model_far_below_shifted_model_and_collapsed_diversity_is_zero():
    model = _model()
    prompts = ["five"] * 64
    with torch.no_grad():
        fa = model.features(_sample(model, model.base_velocity, prompts, seed=10))
        fb = model.features(_sample(model, model.base_velocity, prompts, seed=11))
        _perturb_lora(model, 0.3, seed=5)
        fs = model.features(_sample(model, model.velocity, prompts, seed=11))
    same, shifted = frechet_distance(fa, fb), frechet_distance(fs, fa)
    assert same < 0.25 * shifted, (same, shifted)
    collapsed = fa[:1].expand(16, -1)
    assert feature_diversity(collapsed) < 1e-10 < feature_diversity(fa[:16])


# ---- VGG-Flow's value network, export, preview -------------------------------------------------------------
def test_value_network_shape_tiny_init_and_gradients():
    model = _model()
    net = model.make_value_network()
    x, t, _, cond = _inputs(model)
    out = net(x, t, cond)
    assert out.shape == x.shape
    assert out.abs().max() < 1e-2
    out.pow(2).sum().backward()
    assert net.unet.conv_out.weight.grad.abs().sum() > 0


def test_save_finetuned_writes_diffusers_lora_and_loads_back(tmp_path):
    from safetensors.torch import load_file

    model = _model()
    _perturb_lora(model)
    model.save_finetuned(str(tmp_path))
    state = load_file(str(tmp_path / LORA_WEIGHT_NAME))
    assert state and all(k.startswith("transformer.") and ".lora_" in k for k in state)
    assert any(k.endswith("attn.to_q.lora_A.weight") for k in state)
    other = _model()
    other.load_finetuned(str(tmp_path))
    x, t, _, cond = _inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(other.velocity(x, t, cond), model.velocity(x, t, cond))


def test_preview_grid_and_decode_range():
    model = _model()
    x = 2 * torch.randn(20, 1, 8, 8)
    img = model.decode(x)
    assert img.shape == (20, 1, 8, 8) and img.min() >= 0 and img.max() <= 1
    grid = model.preview_grid(x)
    assert grid.dim() == 3 and grid.shape[0] == 3
