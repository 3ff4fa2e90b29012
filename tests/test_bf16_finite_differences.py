"""bf16 networks: the timestep goes to the transformer in fp32 as in the diffusers pipeline, and
VGG-Flow's consistency residual differentiates a bf16 network accurately at the default settings.

References are independent of our code paths: the diffusers pipeline's own transformer call (scheduler timesteps
in fp32) for τ, and for the residual's terms the digits model in float64 differentiated by
``torch.autograd.functional.jvp`` (double backward, math attention kernel).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from align.setup.compose import compose_config
from align.core.interfaces import Reward
from align.models.digits import DigitsFlow
from align.models.flow_transformer import t_to_sigma, u_to_v
from algorithms.common.value_gradient import consistency_residual, network_dtype, use_network_jvp
from algorithms.vggflow import VGGFlow
from samplers import one_step_prediction, sd3_grid
from helpers.tiny_sd3 import RESOLUTION, build_tiny_sd3

torch.set_num_threads(1)
PROMPTS = ["three", "seven", "zero", "four", "one", "nine", "two", "eight"]
TOL = 0.05


def _digits(dtype: torch.dtype) -> DigitsFlow:
    """The shipped digits model (random weights of its architecture without them); bf16: the transformer's own
    weights in bf16 and the LoRA in fp32, as SD3 at model.dtype=bf16."""
    torch.manual_seed(0)
    try:
        model = DigitsFlow()
    except FileNotFoundError:
        model = DigitsFlow(pretrained=False)
    if dtype == torch.float64:
        return model.double()
    for name, p in model.transformer.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(dtype)
    return model


def _inputs(n: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    t = 0.1 + 0.8 * torch.rand(n, generator=gen)
    d = torch.randn(n, 1, 8, 8, generator=gen)
    return x, t, d


def _rel(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (a.double() - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)


def _check(a: torch.Tensor, ref: torch.Tensor, what: str, tol: float = TOL) -> None:
    """Within 5 % over the batch of states (‖a − ref‖ / ‖ref‖, as the residual enters the loss: a mean over
    states), and no state beyond 8 % (bf16 computes the network itself to ≈ 1.5 %; its derivative by forward-mode
    AD lands at 1–5 % per state)."""
    per_state, total = _rel(a, ref), ((a.double() - ref).norm() / ref.norm()).item()
    print(f"{what}: relative error over the batch {total:.4f}, per state {[round(e, 4) for e in per_state.tolist()]}")
    assert ref.abs().max() > 0.1
    assert total < tol and per_state.max() < max(0.08, 1.5 * tol), (total, per_state)


def _ref_jvp(f, a: torch.Tensor, da: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.MATH):               # the fused CPU kernel has no double backward
        return torch.autograd.functional.jvp(f, (a,), (da,))[1]


@pytest.fixture(scope="module")
def models():
    return _digits(torch.bfloat16), _digits(torch.float64)


@pytest.fixture(scope="module")
def algo_cfg():
    return compose_config(["model=digits", "algo=vggflow"]).algo


# ---- τ in fp32 -------------------------------------------------------------------------------------------------
def test_bf16_transformer_gets_the_pipeline_fp32_timestep(tmp_path):
    """Our u(x, σ) on a bf16 SD3 = the diffusers pipeline's call of its bf16 transformer at the scheduler's fp32
    timesteps (``timestep = t.expand(B)``), at every σ of the sd3 grid."""
    from diffusers import StableDiffusion3Pipeline

    path = build_tiny_sd3(str(tmp_path / "tiny_sd3"), t5=False)
    from align.core.registry import MODELS

    model = MODELS.get("sd3")(pretrained=path, dtype="bf16", resolution=RESOLUTION, decoder="vae", t5=False,
                              features={"kind": "pixels"}, keep_text_encoders=True)
    pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=torch.bfloat16, text_encoder_3=None,
                                                    tokenizer_3=None)
    assert pipe.transformer.dtype == model.transformer.dtype == torch.bfloat16
    steps = 20
    pipe.scheduler.set_timesteps(steps)
    ts = sd3_grid(steps, model.scheduler_shift)
    torch.testing.assert_close((1.0 - ts[:-1]).float(), pipe.scheduler.sigmas[:-1])   # our grid: t = 1 − σ
    cond = model.encode(["a photo of a cat", "a dog"])
    x = torch.randn(2, *model.data_shape, generator=torch.Generator().manual_seed(0))
    worst = 0.0
    with torch.no_grad():
        for k, tau in enumerate(pipe.scheduler.timesteps):
            ref = pipe.transformer(hidden_states=x.to(torch.bfloat16), timestep=tau.expand(2),
                                   encoder_hidden_states=cond["encoder_hidden_states"].to(torch.bfloat16),
                                   pooled_projections=cond["pooled_projections"].to(torch.bfloat16),
                                   return_dict=False)[0].float()
            ours = model.transformer_u(x, 1.0 - ts[k].expand(2), cond)
            worst = max(worst, ((ours - ref).abs().max() / ref.abs().max()).item())
    print(f"max relative difference to the pipeline's call {worst:.3g}")
    assert worst < 1e-3, worst                           # before: 3.3e-2 (τ rounded to bf16)


# ---- the residual's terms ------------------------------------------------------------------------------------
def test_defaults_pick_forward_mode_for_bf16_and_keep_fd_in_fp32(models, algo_cfg):
    m16, m64 = models
    assert network_dtype(m16) == torch.bfloat16 and network_dtype(m64) == torch.float64
    assert use_network_jvp(algo_cfg.fd_network, network_dtype(m16))
    assert not use_network_jvp(algo_cfg.fd_network, torch.float32)        # fp32 runs: the former finite differences
    assert float(algo_cfg.fd_eps) == float(algo_cfg.fd_delta) == 3e-5
    assert algo_cfg.fd_terms == "spacetime" and algo_cfg.fd_scheme == "forward"


def test_residual_jvp_of_the_bf16_base_velocity_matches_fp64_autograd(models, algo_cfg):
    """With g ≡ d (constant) the residual is exactly J_{v_base}·d; at the default settings on the bf16 digits
    model it is within 5 % of the fp64 model's autograd J·d."""
    m16, m64 = models
    x, t, d = _inputs()
    c16, c64 = m16.encode(PROMPTS), {k: v.double() for k, v in m64.encode(PROMPTS).items()}

    def v16(xx, tt):
        with torch.no_grad():
            return m16.base_velocity(xx, tt, c16)

    jvp = use_network_jvp(algo_cfg.fd_network, network_dtype(m16))
    const = lambda xx, tt, x_hat=None: d  # noqa: E731
    ours = consistency_residual(const, v16, x, t, float(algo_cfg.beta), float(algo_cfg.fd_eps),
                                float(algo_cfg.fd_delta), algo_cfg.fd_scheme, jvp=jvp)
    ref = _ref_jvp(lambda xx: m64.base_velocity(xx, t.double(), c64), x.double(), d.double())
    _check(ours, ref, "J_vbase·d")


class PixelQuadratic(Reward):
    """r(img) = −½ ‖img − 0.4‖²."""

    name, domain = "pixel_quadratic", "digits"

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return -0.5 * (images - 0.4).pow(2).flatten(1).sum(1)


def _smooth_decode(x: torch.Tensor) -> torch.Tensor:
    """A smooth decoder (curvature on the scale of x, as a VAE's) in place of the digits' sharp clamp (sharpness
    50: its Hessian changes on a scale of 0.02, about the bf16 error of x̂_1 itself, so there even the exact ∂ₜg of
    the bf16 model is 3–10 % from the fp64 model's whatever the differentiation)."""
    return torch.sigmoid(2.0 * x)


@pytest.mark.parametrize("moving", [False, True], ids=["d_t", "d_t+J_g.d"])
def test_residual_g_terms_of_the_vggflow_value_gradient_match_fp64_autograd(models, algo_cfg, monkeypatch, moving):
    """The residual's g terms ∂ₜg + J_g·d of VGG-Flow's g_φ(x, t) = −t²∇r(x̂_1(x, t)) + N_φ(x, t)/β (x̂_1 through
    the bf16 network) at the default settings (``fd_terms``, ``fd_scheme``), within 5 % of fp64 autograd on the
    float64 digits model. Isolated with β = 0 in the residual and v_base ≡ d constant (so J_{v_base} = 0 and the
    direction is d): d = 0 leaves ∂ₜg alone, a random d moves x and t together."""
    m16, m64 = models
    monkeypatch.setattr(m16, "decode", _smooth_decode)
    reward = PixelQuadratic()
    algo = VGGFlow(algo_cfg, m16, reward, sd3_grid(20, 3.0))
    assert algo.value_net is not None
    x, t, d = _inputs(seed=1)
    d = d if moving else torch.zeros_like(d)
    c16 = m16.encode(PROMPTS)

    def g_field(xx, tt, x_hat=None):                 # as VGGFlow.loss builds it (clip off: tau=None)
        return algo.value_gradient(xx, tt, c16, PROMPTS, None, x_hat=x_hat)

    def predictor(xx, tt):
        with torch.no_grad():
            return one_step_prediction(xx, tt, m16.velocity(xx, tt, c16))

    with torch.no_grad():
        ours = consistency_residual(g_field, lambda xx, tt: d, x, t, 0.0, float(algo_cfg.fd_eps),
                                    float(algo_cfg.fd_delta), algo_cfg.fd_scheme,
                                    time_scale=float(algo_cfg.time_derivative_scale), predictor=predictor,
                                    jvp=algo.network_jvp, spacetime=algo_cfg.fd_terms == "spacetime")

    # fp64 reference, written from the definition with autograd throughout
    c64 = {k: v.double() for k, v in m64.encode(PROMPTS).items()}
    value64 = copy.deepcopy(algo.value_net).double()
    beta = algo.beta

    def g64(xx, tt):
        with torch.enable_grad():
            # v_θ with CFG, both branches differentiated (velocity() would hold the unconditional branch
            # constant when x does not require grad)
            v = u_to_v(m64.guided_u(xx, t_to_sigma(tt), c64, detach_uncond=False))
            xh = one_step_prediction(xx, tt, v)
            y = xh if xh.requires_grad else xh.requires_grad_(True)
            (grad_r,) = torch.autograd.grad(reward(_smooth_decode(y), PROMPTS).sum(), y, create_graph=True)
        return -(tt ** 2).reshape(-1, 1, 1, 1) * grad_r + value64(xx, tt, c64) / beta

    with sdpa_kernel(SDPBackend.MATH):               # the fused CPU kernel has no double backward
        ref = torch.autograd.functional.jvp(
            g64, (x.double(), t.double()),
            (d.double(), float(algo_cfg.time_derivative_scale) * torch.ones_like(t.double())))[1]
    _check(ours, ref, "d_t g + J_g d" if moving else "d_t g")


def test_residual_terms_on_the_tiny_sd3_in_bf16_match_fp64_autograd(tmp_path, algo_cfg):
    """The same two terms through ``model=sd3`` itself (SD3Transformer2DModel + peft LoRA + CFG w = 5, loaded in
    bf16): J_{v_base}·d, and the residual's ∂ₜ term for g = x̂_1(x, t) (∂ₜx̂_1 = −v + (1 − t)∂ₜv), against the same
    bf16 weights computed in float64 (the random tiny SD3's fp32→bf16 weight rounding alone moves these by a few %
    under CFG w = 5)."""
    from align.core.registry import MODELS

    path = build_tiny_sd3(str(tmp_path / "tiny_sd3"), t5=False)
    kw = dict(pretrained=path, resolution=RESOLUTION, decoder="vae", t5=False, features={"kind": "pixels"},
              keep_text_encoders=True)
    torch.manual_seed(0)
    m16 = MODELS.get("sd3")(dtype="bf16", **kw)
    torch.manual_seed(0)
    m64 = MODELS.get("sd3")(dtype="bf16", **kw).double()      # the same bf16 weights, computed in float64
    prompts = ["a photo of a cat", "a dog in the snow", "a red car"]
    c16 = m16.encode(prompts)
    c64 = {k: v.double() for k, v in c16.items()}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(len(prompts), *m16.data_shape, generator=gen)
    t = torch.tensor([0.2, 0.5, 0.8])
    d = torch.randn(x.shape, generator=gen)
    jvp = use_network_jvp(algo_cfg.fd_network, network_dtype(m16))
    eps, delta, scheme = float(algo_cfg.fd_eps), float(algo_cfg.fd_delta), algo_cfg.fd_scheme

    def v16(xx, tt):
        with torch.no_grad():
            return m16.base_velocity(xx, tt, c16)

    def predictor(xx, tt):
        with torch.no_grad():
            return one_step_prediction(xx, tt, m16.velocity(xx, tt, c16))

    def g_hat(xx, tt, x_hat=None):
        return predictor(xx, tt) if x_hat is None else x_hat

    zero = lambda xx, tt: torch.zeros_like(xx)  # noqa: E731
    const = lambda xx, tt, x_hat=None: d  # noqa: E731
    ours_j = consistency_residual(const, v16, x, t, float(algo_cfg.beta), eps, delta, scheme, jvp=jvp)
    ours_t = consistency_residual(g_hat, zero, x, t, 0.0, eps, delta, scheme, predictor=predictor, jvp=jvp,
                                  spacetime=algo_cfg.fd_terms == "spacetime")
    ref_j = _ref_jvp(lambda xx: m64.base_velocity(xx, t.double(), c64), x.double(), d.double())
    ref_t = _ref_jvp(lambda tt: one_step_prediction(x.double(), tt, u_to_v(m64.guided_u(
        x.double(), t_to_sigma(tt), c64, detach_uncond=False))), t.double(), torch.ones(3, dtype=torch.float64))
    # CFG w = 5 amplifies bf16 rounding (w·u_cond − (w − 1)·u_uncond): 3–5 % here, so a 10 % bound; the former
    # finite differences at ε = 1e-3 were off by 1200–1700 %
    _check(ours_j, ref_j, "sd3 J_vbase·d", tol=0.10)
    _check(ours_t, ref_t, "sd3 d_t x_hat", tol=0.10)
