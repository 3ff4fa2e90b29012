"""The gradient-HJB of VGG-Flow (paper Eqs. 10–12, App. C.1), by finite differences with stop-gradiented directions.

With g = ∇_x V and β = 1/λ, the value gradient satisfies
    ∂_t g + J_gᵀ (v_base − β g) + J_{v_base}ᵀ g = 0,        g(x, 1) = −∇r(x).
J_g is a Hessian (symmetric) and J_{v_base} is symmetric for exact marginal fields, so the transposed
products are computed as directional derivatives (JVPs) by finite differences. Directions are detached,
so no second-order backprop ever happens; gradients reach φ only through the g evaluations.

Low-precision networks (``algo.fd_network``; ``auto`` = whenever the flow network computes in bf16/fp16, as SD3
does): a finite difference of a bf16 network at the fp32 steps ε = δ = 1e-3 is rounding noise (bf16 resolves
2⁻⁸ relative; on the digits transformer in bf16, J·d is off by 100–900 % at ε = 1e-3 and still 8–20 % at the best
ε ≈ 0.1; ∂ₜv is off by ≈ 100 % at every δ, its time embedding oscillating at scale Δτ ≈ 1). So there the network is
differentiated by forward-mode AD (``network_jvp``: exact up to bf16 rounding, within 2–4 % of the fp64 model),
J_{v_base}·g directly and the network inside g, x̂_1(x, t) = x + (1 − t) v_θ(x, t), as a linearisation
x̂_1 ± h·(J x̂_1·d) inside the finite difference of g, whose other parts (the reward gradient, η_t, the value
network N_φ, in fp32) keep the steps ε, δ and carry φ's gradients as before. fp32/fp64 models: unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.autograd.forward_ad as fwAD
from align.core.batching import per_sample

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOW_PRECISION = (torch.bfloat16, torch.float16)
FD_NETWORK_MODES = ("auto", "fd", "jvp")


def network_dtype(model: Any) -> torch.dtype:
    """The dtype the flow network computes in: its ``transformer``'s, else its lowest-precision floating parameter
    (fp32 when it has none)."""
    net = getattr(model, "transformer", None)
    if isinstance(getattr(net, "dtype", None), torch.dtype):
        return net.dtype
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()} if hasattr(model, "parameters") else ()
    return max(dtypes, key=lambda d: torch.finfo(d).eps) if dtypes else torch.float32


def use_network_jvp(mode: str | None, dtype: torch.dtype) -> bool:
    """``algo.fd_network``: auto (forward-mode AD for bf16/fp16 networks, finite differences otherwise) | fd | jvp."""
    mode = "auto" if mode is None else mode
    if mode not in FD_NETWORK_MODES:
        raise ValueError(f"unknown algo.fd_network={mode!r}; valid choices: {', '.join(FD_NETWORK_MODES)}")
    return dtype in LOW_PRECISION if mode == "auto" else mode == "jvp"


@contextlib.contextmanager
def _forward_ad_attention() -> Iterator[None]:
    """The math kernel of scaled_dot_product_attention: the fused (flash / memory-efficient) kernels have no
    forward-mode derivative."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:                      # torch < 2.3: nothing to choose
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


def network_jvp(f: Field, x: torch.Tensor, t: torch.Tensor, dx: torch.Tensor | None = None,
                dt: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x, t), J_x f·dx + ∂ₜf·dt) by forward-mode AD (no graph kept); a missing tangent counts as 0."""
    with torch.no_grad(), fwAD.dual_level(), _forward_ad_attention():
        xd = x.detach() if dx is None else fwAD.make_dual(x.detach(), dx.detach().to(x.dtype))
        td = t.detach() if dt is None else fwAD.make_dual(t.detach(), dt.detach().to(t.dtype))
        primal, tangent = fwAD.unpack_dual(f(xd, td))
        primal = primal.clone()
        tangent = torch.zeros_like(primal) if tangent is None else tangent.clone()
    return primal, tangent


def _rms(d: torch.Tensor) -> torch.Tensor:
    """Per-sample root-mean-square of a direction, shaped to broadcast."""
    r = d.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12)
    return per_sample(r, d)


def directional_derivative(f: Field, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor, eps: float,
                           scheme: str = "central", f_x: torch.Tensor | None = None,
                           step_scale: float | None = None) -> torch.Tensor:
    """J_f(x, t)·d by a finite difference along the detached direction d.

    The step is ε·d/rms(d) (ε is per-coordinate, whatever the scale of d) and the result is rescaled by
    rms(d), so it is exact for linear f. ``step_scale`` = c instead takes the step ε·c·d as it is (the preview
    code's steps, ``raw_steps`` of ``consistency_residual``). ``forward`` reuses f_x = f(x, t) when given.
    """
    d = d.detach()
    s = _rms(d) if step_scale is None else torch.tensor(1.0 / step_scale, dtype=d.dtype, device=d.device)
    step = eps * d / s
    if scheme == "central":
        return (f(x + step, t) - f(x - step, t)) * (s / (2 * eps))
    if scheme == "forward":
        f_x = f(x, t) if f_x is None else f_x
        return (f(x + step, t) - f_x) * (s / eps)
    raise ValueError(f"unknown finite-difference scheme {scheme!r}; valid choices: central, forward")


def time_derivative(f: Field, x: torch.Tensor, t: torch.Tensor, delta: float, scheme: str = "central",
                    f_x: torch.Tensor | None = None) -> torch.Tensor:
    """∂_t f(x, t) at fixed x (the partial derivative; transport is in the J_g term)."""
    if scheme == "central":
        return (f(x, t + delta) - f(x, t - delta)) / (2 * delta)
    if scheme == "forward":
        f_x = f(x, t) if f_x is None else f_x
        return (f(x, t + delta) - f_x) / delta
    raise ValueError(f"unknown finite-difference scheme {scheme!r}; valid choices: central, forward")


def _spacetime_step(d: torch.Tensor, c: float, t: torch.Tensor, eps: float, delta: float, scheme: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h [B], t + h c, t − h c or t) for a step ±h·(d, c): h = min(ε/rms(d), δ/|c|), so that the x-step's
    per-coordinate RMS is at most ε and the t-step at most δ (the separate differences' steps); then h is the step
    t actually takes in its own precision (fp32 t near 1 rounds a 3e-5 step by up to 0.2 %, the same sign for
    every evaluation at that t)."""
    if scheme not in ("central", "forward"):
        raise ValueError(f"unknown finite-difference scheme {scheme!r}; valid choices: central, forward")
    h = eps / _rms(d).flatten(1)[:, 0]
    if not c:
        return h, t, t
    h = h.clamp(max=delta / abs(c))
    t_plus = t + (h * c).to(t.dtype)
    t_minus = t - (h * c).to(t.dtype) if scheme == "central" else t
    taken = (t_plus - t_minus).to(h.dtype) / (c * (2 if scheme == "central" else 1))
    return torch.where(taken > 0, taken, h), t_plus, t_minus


def spacetime_derivative(f: Field, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor, c: float, eps: float,
                         delta: float, scheme: str = "forward", f_x: torch.Tensor | None = None) -> torch.Tensor:
    """c·∂ₜf + J_f·d at (x, t): the derivative along the space-time direction (d, c), one finite difference
    [f(x + h d, t + h c) − f(x, t)] / h (``forward``, reusing f_x) or the central one, h from ``_spacetime_step``.
    Exact for f linear in (x, t); one evaluation of f where ``directional_derivative`` + ``time_derivative`` take
    two (forward) or four (central)."""
    d = d.detach()
    h, t_plus, t_minus = _spacetime_step(d, c, t, eps, delta, scheme)
    hx = per_sample(h, x).to(x.dtype)
    if scheme == "central":
        return (f(x + hx * d, t_plus) - f(x - hx * d, t_minus)) / (2 * hx)
    f_x = f(x, t) if f_x is None else f_x
    return (f(x + hx * d, t_plus) - f_x) / hx


def spacetime_derivative_through(g: Callable[..., torch.Tensor], predictor: Field, x: torch.Tensor,
                                 t: torch.Tensor, d: torch.Tensor, c: float, eps: float, delta: float,
                                 scheme: str = "forward", x_hat: torch.Tensor | None = None,
                                 g_x: torch.Tensor | None = None) -> torch.Tensor:
    """``spacetime_derivative`` of g(x, t) = G(x, t, x̂_1(x, t)) with x̂_1 linearised by forward-mode AD along
    (d, c): x̂_1(x + h d, t + h c) ≈ x̂_1 + h (J x̂_1·(d, c)); ``g(x, t, x_hat=...)``. ``x_hat`` (x̂_1 at (x, t))
    and ``g_x`` = g(x, t, x_hat=x_hat) when already computed: the forward difference then costs one g."""
    d = d.detach()
    h, t_plus, t_minus = _spacetime_step(d, c, t, eps, delta, scheme)
    y, y_w = network_jvp(predictor, x, t, dx=d, dt=torch.full_like(t, c))
    y = y if x_hat is None else x_hat.to(y.dtype)
    hx, hy = per_sample(h, x).to(x.dtype), per_sample(h, y).to(y.dtype)
    if scheme == "central":
        return (g(x + hx * d, t_plus, x_hat=y + hy * y_w) - g(x - hx * d, t_minus, x_hat=y - hy * y_w)) / (2 * hx)
    g_x = g(x, t, x_hat=y) if g_x is None else g_x
    return (g(x + hx * d, t_plus, x_hat=y + hy * y_w) - g_x) / hx


def consistency_residual(g: Field, v_base: Field, x: torch.Tensor, t: torch.Tensor, beta: float,
                         eps: float, delta: float, scheme: str = "central",
                         g_x: torch.Tensor | None = None, v_base_x: torch.Tensor | None = None,
                         time_scale: float = 1.0, predictor: Field | None = None,
                         jvp: bool = False, spacetime: bool = False,
                         x_hat: torch.Tensor | None = None, raw_steps: bool = False) -> torch.Tensor:
    """R = ∂_t g + J_gᵀ(v_base − β g) + J_{v_base}ᵀ g at (x, t), all by finite differences.

    ``g_x``/``v_base_x`` are g(x, t) and v_base(x, t) when already computed. ``time_scale`` multiplies
    ∂_t g (1 in the paper; the preview code's τ = 1000σ units correspond to 1e−3).

    ``raw_steps`` (separate differences, no ``jvp``): the x-steps of the authors' preview code, x + ε·g for
    J_{v_base}·g and x − ε·(v_base − βg)/β for J_g·(v_base − βg) (its direction u_base/β + g in SD3's u = −v), in
    place of steps of per-coordinate RMS ε.

    ``spacetime=True``: ∂_t g + J_g(v_base − βg) is one derivative of g along the space-time direction
    (v_base − βg, 1) (``spacetime_derivative``: one difference of g instead of two; the paper's Eq. 43 moves x
    and t together); otherwise ∂_t g and J_g·d are differenced separately.

    ``jvp=True`` (low-precision networks, see the module docstring): J_{v_base}·g by forward-mode AD, and, when
    ``predictor`` (x, t) ↦ x̂_1 is given, ``g`` is called as ``g(x, t, x_hat=...)`` with x̂_1 linearised by
    forward-mode AD inside the finite differences of g (``time_derivative_through``,
    ``directional_derivative_through``, ``spacetime_derivative_through``, which reuses ``x_hat`` = x̂_1(x, t), and
    then g_x = g(x, t, x_hat=x_hat), when given); without ``predictor`` g is differenced as it is.
    """
    if raw_steps and (jvp or spacetime):
        raise ValueError("the preview code's raw finite-difference steps (algo.fd_step=raw) difference g and v_base "
                         "separately and the network itself: set algo.fd_terms=separate and algo.fd_network=fd")
    g_x = g(x, t) if g_x is None else g_x
    v_base_x = v_base(x, t) if v_base_x is None else v_base_x
    direction = (v_base_x - beta * g_x).detach()
    if jvp:
        d_b = network_jvp(v_base, x, t, dx=g_x.detach())[1]
    else:
        d_b = directional_derivative(v_base, x, t, g_x.detach(), eps, scheme, f_x=v_base_x,
                                     step_scale=1.0 if raw_steps else None)
    through = jvp and predictor is not None
    if spacetime and through:
        # g_x is reused only with the x̂_1 it was computed from: a bf16 x̂_1 recomputed by another kernel (the
        # JVP's) differs by rounding, which a difference at step h would amplify by 1/h
        d_g = spacetime_derivative_through(g, predictor, x, t, direction, time_scale, eps, delta, scheme,
                                           x_hat=x_hat, g_x=None if x_hat is None else g_x)
    elif spacetime:
        d_g = spacetime_derivative(g, x, t, direction, time_scale, eps, delta, scheme, f_x=g_x)
    elif through:
        d_g = (time_scale * time_derivative_through(g, predictor, x, t, delta, scheme)
               + directional_derivative_through(g, predictor, x, t, direction, eps, scheme))
    else:
        d_g = (time_scale * time_derivative(g, x, t, delta, scheme, f_x=g_x)
               + directional_derivative(g, x, t, direction, eps, scheme, f_x=g_x,
                                        step_scale=-1.0 / beta if raw_steps else None))
    return d_g + d_b


def time_derivative_through(g: Callable[..., torch.Tensor], predictor: Field, x: torch.Tensor, t: torch.Tensor,
                            delta: float, scheme: str = "central") -> torch.Tensor:
    """∂ₜ g(x, t) for g(x, t) = G(x, t, x̂_1(x, t)): x̂_1(x, t ± δ) ≈ x̂_1 ± δ ∂ₜx̂_1 with ∂ₜx̂_1 by forward-mode AD
    (the network), the rest of g differenced at step δ; ``g(x, t, x_hat=...)``."""
    y, y_t = network_jvp(predictor, x, t, dt=torch.ones_like(t))
    if scheme == "central":
        return (g(x, t + delta, x_hat=y + delta * y_t) - g(x, t - delta, x_hat=y - delta * y_t)) / (2 * delta)
    if scheme == "forward":
        return (g(x, t + delta, x_hat=y + delta * y_t) - g(x, t, x_hat=y)) / delta
    raise ValueError(f"unknown finite-difference scheme {scheme!r}; valid choices: central, forward")


def directional_derivative_through(g: Callable[..., torch.Tensor], predictor: Field, x: torch.Tensor,
                                   t: torch.Tensor, d: torch.Tensor, eps: float,
                                   scheme: str = "central") -> torch.Tensor:
    """J_g(x, t)·d for g(x, t) = G(x, t, x̂_1(x, t)), as ``directional_derivative`` (step ε·d/rms(d)) with
    x̂_1(x ± step) ≈ x̂_1 ± ε (J x̂_1·d/rms(d)) by forward-mode AD; ``g(x, t, x_hat=...)``."""
    d = d.detach()
    s = _rms(d)
    unit = d / s
    y, y_d = network_jvp(predictor, x, t, dx=unit)
    step = eps * unit
    if scheme == "central":
        return (g(x + step, t, x_hat=y + eps * y_d) - g(x - step, t, x_hat=y - eps * y_d)) * (s / (2 * eps))
    if scheme == "forward":
        return (g(x + step, t, x_hat=y + eps * y_d) - g(x, t, x_hat=y)) * (s / eps)
    raise ValueError(f"unknown finite-difference scheme {scheme!r}; valid choices: central, forward")
