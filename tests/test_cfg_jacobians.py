"""CFG under autograd: x-Jacobians see both branches, θ-gradients only the conditional one.

v_θ^cfg = v_uncond + w (v_cond − v_uncond). Training detaches θ from the unconditional branch (the authors'
code, reference §0), but the Jacobian w.r.t. x must be w·J_cond + (1 − w)·J_uncond: VGG-Flow-PMP's full
costate and DRaFT-K's x-chain differentiate v_θ w.r.t. x. Every expected value below comes from an
independent computation: the transformer called directly on both prompts (``torch.func.functional_call``
with detached LoRA weights where θ must not reach the unconditional branch, zeroed lora_B for the base
model), unrolled along the Euler chain and differentiated by plain autograd.
"""
from __future__ import annotations

import os

import pytest
import torch
from omegaconf import OmegaConf
from torch.func import functional_call
from torch.nn import functional as F

import algorithms.draft as draft_module
from algorithms.draft import DRaFT
from algorithms.vggflow_pmp import VGGFlowPMP
from align.core.interfaces import Reward
from align.metrics.digits_classifier import CLASSIFIER_WEIGHTS
from align.models.digits import FLOW_WEIGHTS, DigitsFlow
from align.core.registry import MODELS
from samplers import Trajectory, euler_integrate, sd3_grid
from helpers.tiny_sd3 import RESOLUTION, build_tiny_sd3

torch.set_num_threads(1)

HAVE_WEIGHTS = os.path.isfile(FLOW_WEIGHTS) and os.path.isfile(CLASSIFIER_WEIGHTS)
N_STEPS = 4
BETA = 2.0
DIGIT_PROMPTS = ["three", "seven"]
SD3_PROMPTS = ["a photo of a cat", "a dog in the snow"]


# ---- models and a reward ---------------------------------------------------------------------------------
class PooledReward(Reward):
    """A fixed smooth nonlinear score of 4×4-pooled images (tests only)."""

    name, domain = "cfg_test_pooled", ""

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        p = F.adaptive_avg_pool2d(images.float(), 4).flatten(1)
        w = torch.sin(torch.arange(p.shape[1], dtype=p.dtype) * 0.37 + 0.1)
        return (p * w).sum(1) + 0.5 * (p - 0.3).pow(2).sum(1)


def _perturb_lora(model, scale: float, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def _digits(**kw):
    torch.manual_seed(0)
    model = DigitsFlow(**kw) if HAVE_WEIGHTS else DigitsFlow(pretrained=False, **kw)
    _perturb_lora(model, 0.1)
    return model


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> str:
    return build_tiny_sd3(str(tmp_path_factory.mktemp("tiny_sd3_cfg")), t5=False)


def _sd3(path: str, **kw):
    args = dict(pretrained=path, dtype="float32", resolution=RESOLUTION, decoder="vae", t5=False,
                features={"kind": "pixels"}, keep_text_encoders=True)
    args.update(kw)
    torch.manual_seed(0)
    model = MODELS.get("sd3")(**args)
    _perturb_lora(model, 0.1)
    return model


@pytest.fixture(params=["digits", "sd3"])
def setup(request):
    """(model, prompts, cond, x0, grid) on the digits model (w = 2) or the tiny SD3 (w = 5)."""
    if request.param == "digits":
        model, prompts = _digits(), DIGIT_PROMPTS
    else:
        model, prompts = _sd3(request.getfixturevalue("sd3_dir")), SD3_PROMPTS
    x0 = model.sample_noise(len(prompts), torch.Generator().manual_seed(3))
    return model, prompts, model.encode(prompts), x0, sd3_grid(N_STEPS)


# ---- the independent reference velocity ------------------------------------------------------------------
def _raw_u(model, x, sigma, cond, params=None):
    """The transformer's u(x, σ, c) at τ = 1000σ, optionally with some parameters replaced (functional_call)."""
    kw = dict(hidden_states=x, encoder_hidden_states=cond["encoder_hidden_states"],
              pooled_projections=cond["pooled_projections"], timestep=1000.0 * sigma, return_dict=False)
    if params is None:
        return model.transformer(**kw)[0]
    return functional_call(model.transformer, params, (), kw)[0]


def _lora(model):
    return {n: p for n, p in model.transformer.named_parameters() if "lora_" in n}


def ref_velocity(model, x, t, cond, uncond="full"):
    """v = −[u_n + w (u_c − u_n)] with the unconditional branch ``full`` (θ and x), ``theta_detached``
    (LoRA weights detached, x in the graph) or ``base`` for the whole velocity (lora_B = 0: the base model)."""
    w, sigma = model.guidance_scale, 1.0 - t
    neg = model.negative_cond(x.shape[0])
    if uncond == "base":
        zero_b = {n: torch.zeros_like(p) for n, p in _lora(model).items() if "lora_B" in n}
        u_c, u_n = _raw_u(model, x, sigma, cond, zero_b), _raw_u(model, x, sigma, neg, zero_b)
    else:
        u_c = _raw_u(model, x, sigma, cond)
        detached = {n: p.detach() for n, p in _lora(model).items()} if uncond == "theta_detached" else None
        u_n = _raw_u(model, x, sigma, neg, detached)
    return -(u_n + w * (u_c - u_n))


def _t(ts, j, x):
    return torch.full((x.shape[0],), float(ts[j]), dtype=x.dtype)


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _rollout(model, cond, x0, ts):
    return euler_integrate(lambda x, t: model.velocity(x, t, cond), x0, ts)


# ---- VGG-Flow-PMP's full costate ---------------------------------------------------------------------------
def _pmp(model, ts):
    cfg = OmegaConf.create({"name": "vggflow_pmp", "lr": 1e-4, "beta": BETA, "adjoint": "full", "target": "next",
                            "subsample_bins": 2})
    return VGGFlowPMP(cfg, model, PooledReward(), ts)


def ref_costate(model, reward, xs, ts, cond, prompts, k):
    """∂/∂x_k of J = Σ_{j≥k} Δt_j (λ/2)‖v_θ − v_base‖² − r(decode(x_N)) through the un-detached CFG chain."""
    lam = 1.0 / BETA
    x = xs[k].clone().requires_grad_(True)
    y, cost = x, torch.zeros(())
    for j in range(k, len(ts) - 1):
        dt = float(ts[j + 1] - ts[j])
        v = ref_velocity(model, y, _t(ts, j, y), cond)
        v_base = ref_velocity(model, y, _t(ts, j, y), cond, uncond="base")
        cost = cost + dt * 0.5 * lam * (v - v_base).pow(2).sum()
        y = y + dt * v
    assert _rel(y.detach(), xs[-1]) < 1e-4                       # the unroll retraces the recorded trajectory
    cost = cost - reward(model.decode(y), prompts).sum()
    (g,) = torch.autograd.grad(cost, x)
    return g


def test_pmp_full_costate_is_the_gradient_through_the_undetached_cfg_chain(setup):
    model, prompts, cond, x0, ts = setup
    xs = _rollout(model, cond, x0, ts)
    algo = _pmp(model, ts)
    a = algo.costate(Trajectory(xs=xs, ts=ts, cond=cond, prompts=prompts))
    for k in range(N_STEPS):
        ref = ref_costate(model, algo.reward, xs, ts, cond, prompts, k)
        assert _rel(a[k], ref) < 1e-5, (k, _rel(a[k], ref))
    assert all(p.grad is None for p in model.trainable_parameters())


# ---- DRaFT-K -------------------------------------------------------------------------------------------
def _draft(model, k):
    cfg = OmegaConf.create({"lr": 1e-4, "variant": "k", "k": k, "objective": "raw"})
    return DRaFT(cfg, model, PooledReward(), sd3_grid(N_STEPS))


def _ref_last_k(model, x_start, ts, cond, k, uncond):
    y = x_start
    for j in range(N_STEPS - k, N_STEPS):
        y = y + float(ts[j + 1] - ts[j]) * ref_velocity(model, y, _t(ts, j, y), cond, uncond=uncond)
    return y


@pytest.mark.parametrize("k", [2, 3])
def test_draft_k_state_gradient_is_autograd_through_the_undetached_cfg_chain(setup, monkeypatch, k):
    """∂L/∂x_{N−K} of DRaFT-K's own rollout + loss (x_{N−K} made a leaf) = autograd of the reference chain."""
    model, prompts, cond, x0, ts = setup
    algo = _draft(model, k)
    leaf = {}
    euler = draft_module.euler_integrate

    def start_as_leaf(v, x, ts_, start=0, end=None, grad=False, record=True):
        out = euler(v, x, ts_, start, end, grad=grad, record=record)
        if not grad:                                             # the no-grad prefix: its last state x_{N−K}
            leaf["x"] = out[-1].clone().requires_grad_(True)
            out = torch.cat([out[:-1], leaf["x"][None]])
        return out

    monkeypatch.setattr(draft_module, "euler_integrate", start_as_leaf)
    gen = torch.Generator().manual_seed(0)
    loss, _ = algo.loss(algo.rollout(x0, prompts, cond, gen), gen)
    (got,) = torch.autograd.grad(loss, leaf["x"])

    x = leaf["x"].detach().clone().requires_grad_(True)
    ref_loss = -algo.reward(model.decode(_ref_last_k(model, x, ts, cond, k, "full")), prompts).mean()
    (ref,) = torch.autograd.grad(ref_loss, x)
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert _rel(got, ref) < 1e-5, _rel(got, ref)


def _draft_theta_grads(algo, model, prompts, cond, x0):
    gen = torch.Generator().manual_seed(0)
    traj = algo.rollout(x0, prompts, cond, gen)
    loss, _ = algo.loss(traj, gen)
    return loss, torch.autograd.grad(loss, model.trainable_parameters()), traj


def _flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("k", [2, 3])
def test_draft_k_theta_gradient_keeps_the_unconditional_branch_theta_detached(setup, k):
    """θ-gradients equal those of the reference chain whose unconditional branch sees x but not θ."""
    model, prompts, cond, x0, ts = setup
    algo = _draft(model, k)
    loss, grads, traj = _draft_theta_grads(algo, model, prompts, cond, x0)
    x_start = traj.xs[N_STEPS - k].detach()
    params = model.trainable_parameters()

    def ref(uncond):
        ref_loss = -algo.reward(model.decode(_ref_last_k(model, x_start, ts, cond, k, uncond)), prompts).mean()
        return ref_loss, _flat(torch.autograd.grad(ref_loss, params))

    ref_loss, ref_grads = ref("theta_detached")
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert _rel(_flat(grads), ref_grads) < 1e-5, _rel(_flat(grads), ref_grads)
    _, full_grads = ref("full")                                  # θ through the uncond branch is different
    assert _rel(full_grads, ref_grads) > 1e-2


# ---- gradient checkpointing (tiny SD3): same gradients, θ never leaks into the unconditional branch ---------
def _reentrant(module, *args):
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=True)


@pytest.mark.parametrize("mode", ["diffusers_default", "reentrant"])
def test_cfg_gradients_under_gradient_checkpointing(sd3_dir, mode):
    """diffusers' own (non-reentrant) checkpointing and a reentrant one: x- and θ-gradients of the CFG velocity
    equal the un-checkpointed reference whose unconditional branch sees x but not θ (a reentrant recomputation
    runs with the real LoRA weights, so a θ leak would show here). With diffusers' default, also DRaFT-K's."""
    prompts = SD3_PROMPTS
    ref_model = _sd3(sd3_dir)
    model = _sd3(sd3_dir, gradient_checkpointing=True)
    if mode == "reentrant":
        model.transformer.enable_gradient_checkpointing(_reentrant)
    assert model.transformer.gradient_checkpointing
    cond = model.encode(prompts)
    x0 = model.sample_noise(2, torch.Generator().manual_seed(3))

    x = x0.clone().requires_grad_(True)
    a = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    t = torch.full((2,), 0.4)
    (model.velocity(x, t, cond) * a).sum().backward()       # reentrant checkpoints do not support .grad()
    got_x, got_th = x.grad.clone(), _flat([p.grad for p in model.trainable_parameters()])
    xr = x0.clone().requires_grad_(True)
    ref = (ref_velocity(ref_model, xr, t, cond, uncond="theta_detached") * a).sum()
    ref_x, *ref_th = torch.autograd.grad(ref, [xr, *ref_model.trainable_parameters()])
    assert _rel(got_x, ref_x) < 1e-5, _rel(got_x, ref_x)
    assert _rel(got_th, _flat(ref_th)) < 1e-5, _rel(got_th, _flat(ref_th))
    if mode == "reentrant":
        return      # (a reentrant checkpoint drops θ-gradients of blocks whose inputs need no grad: not CFG's doing)

    k, results = 3, []
    for m in (ref_model, model):
        for p in m.trainable_parameters():
            p.grad = None
        _, grads, _ = _draft_theta_grads(_draft(m, k), m, prompts, cond, x0)
        results.append(_flat(grads))
    assert _rel(results[1], results[0]) < 1e-5, _rel(results[1], results[0])


# ---- cost: nothing more when x does not require grad ----------------------------------------------------------
def test_no_graph_for_the_unconditional_branch_when_x_does_not_require_grad():
    model = _digits()
    cond = model.encode(DIGIT_PROMPTS)
    x = model.sample_noise(2, torch.Generator().manual_seed(0))
    t = torch.full((2,), 0.3)
    calls = []
    hook = model.transformer.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append((torch.is_grad_enabled(), out[0].requires_grad)),
        with_kwargs=True)
    try:
        model.velocity(x, t, cond)                       # matching losses: θ-graph for the conditional branch only
        assert calls == [(True, True), (False, False)]
        calls.clear()
        with torch.no_grad():                            # sampling: one batch of 2B
            model.velocity(x, t, cond)
        assert calls == [(False, False)]
        calls.clear()
        xg = x.clone().requires_grad_(True)              # x-chain: the uncond branch is re-run only in backward
        v = model.velocity(xg, t, cond)
        assert calls == [(True, True), (False, False)]
        v.sum().backward()
        assert len(calls) == 3 and xg.grad is not None
    finally:
        hook.remove()


# ---- DRaFT-LV (point 7b): the n re-noised copies are reduced by mean (default) or sum -------------------------
@pytest.mark.parametrize("reduce", ["mean", "sum", None])
def test_draft_lv_gradient_is_the_mean_or_sum_of_independent_per_copy_gradients(reduce):
    """On the digits CFG model: the LV gradient = (1/n or 1)·Σ_i of per-copy gradients, each computed alone from
    its own ε_i (same stream), its own one-step prediction and the θ-detached reference velocity.
    ``None``: the key absent from the config means ``mean``."""
    n, model, prompts = 3, _digits(), DIGIT_PROMPTS
    cfg = OmegaConf.create({"lr": 1e-4, "variant": "lv", "n": n, "objective": "raw"})
    if reduce is not None:
        cfg.lv_reduce = reduce
    ts = sd3_grid(N_STEPS)
    algo = DRaFT(cfg, model, PooledReward(), ts)
    cond = model.encode(prompts)
    x0 = model.sample_noise(len(prompts), torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(6)
    traj = algo.rollout(x0, prompts, cond, gen)
    state = gen.get_state()
    loss, _ = algo.loss(traj, gen)
    params = model.trainable_parameters()
    got = _flat(torch.autograd.grad(loss, params))

    t_last = float(ts[-2])
    sigma = 1.0 - t_last
    eps = torch.randn((n, *traj.x1.shape), generator=torch.Generator().set_state(state))
    per_copy = []
    for i in range(n):
        x_t = (1.0 - sigma) * traj.x1.detach() + sigma * eps[i]
        t = torch.full((len(prompts),), t_last)
        x_hat = x_t + (1.0 - t_last) * ref_velocity(model, x_t, t, cond, uncond="theta_detached")
        loss_i = -algo.reward(model.decode(x_hat), prompts).mean()
        per_copy.append(_flat(torch.autograd.grad(loss_i, params)))
    expected = torch.stack(per_copy).sum(0) / (n if reduce in ("mean", None) else 1)
    assert _rel(got, expected) < 1e-5, _rel(got, expected)
    assert _rel(per_copy[0], per_copy[1]) > 1e-3                 # the copies do differ


def test_draft_lv_reduce_must_be_mean_or_sum():
    cfg = OmegaConf.create({"lr": 1e-4, "lv_reduce": "max"})
    with pytest.raises(ValueError, match="lv_reduce"):
        DRaFT(cfg, _digits(), PooledReward(), sd3_grid(N_STEPS))
