"""How accurate VGG-Flow's consistency residual is under each finite-difference variant at the default steps:
``python -m experiments.fd_accuracy [--states 24] [key=value ...]`` (digits, fp32, the default reward).

R = ∂_t g + J_g(v_base − βg) + J_{v_base} g at states of a rollout of the shipped digits flow, with VGG-Flow's
g_φ(x, t) = −η_t ∇r(x̂_1) + N_φ(x, t)/β (its freshly initialised value network, no clip). The reference is the
same R of the same networks in float64 by autograd (``torch.autograd.functional.jvp``, both CFG branches
differentiated), written from the definition. Printed: ‖R − R_ref‖ / ‖R_ref‖ over the states, and the 95th
percentile of the per-state error, as a Markdown table (docs/speed.md).
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from align.setup.assemble import build_parts
from align.setup.build import build_algorithm
from align.setup.compose import compose_config
from align.models.flow_transformer import t_to_sigma, u_to_v
from algorithms.common.value_gradient import consistency_residual
from samplers import one_step_prediction

VARIANTS = [("separate", "central"), ("separate", "forward"), ("spacetime", "central"), ("spacetime", "forward")]


def reference(parts, algo, x: torch.Tensor, t: torch.Tensor, cond, prompts: list[str]) -> torch.Tensor:
    """R in float64 by autograd through copies of the model, reward and value network."""
    m64, r64, nu64 = (copy.deepcopy(m).double() for m in (parts.model, parts.reward, algo.value_net))
    c64 = {k: v.double() for k, v in cond.items()}
    x, t, beta = x.double(), t.double(), algo.beta

    def g64(xx: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            y = one_step_prediction(xx, tt, u_to_v(m64.guided_u(xx, t_to_sigma(tt), c64, detach_uncond=False)))
            y = y if y.requires_grad else y.requires_grad_(True)
            (grad_r,) = torch.autograd.grad(r64(m64.decode(y), prompts).sum(), y, create_graph=True)
        return -algo.eta(tt).reshape(-1, 1, 1, 1) * grad_r + nu64(xx, tt, c64) / beta

    def v_base64(xx: torch.Tensor) -> torch.Tensor:
        return m64.base_velocity(xx, t, c64)

    with sdpa_kernel(SDPBackend.MATH):               # the fused CPU kernel has no double backward
        g = g64(x, t).detach()
        d = (v_base64(x) - beta * g).detach()
        along = torch.autograd.functional.jvp(g64, (x, t), (d, torch.ones_like(t)))[1]
        transport = torch.autograd.functional.jvp(v_base64, (x,), (g,))[1]
    return along + transport


def measure(overrides: list[str], n_states: int, seed: int = 0) -> list[dict]:
    torch.set_num_threads(1)
    cfg = compose_config(["model=digits", "algo=vggflow", "algo.rgrad_clip=none", *overrides])
    parts = build_parts(cfg)
    model = parts.model
    algo = build_algorithm(cfg, model, parts.reward, parts.grid)
    gen = torch.Generator().manual_seed(seed)
    prompts = [parts.prompts[i % len(parts.prompts)] for i in range(n_states)]
    cond = model.encode(prompts)
    traj = algo.rollout(model.sample_noise(n_states, gen), prompts, cond, gen)
    k = torch.randint(1, traj.n_steps, (n_states,), generator=gen)     # one state per trajectory, t in (0, 1)
    x, t = traj.xs[k, torch.arange(n_states)], traj.ts[k].float()
    ref = reference(parts, algo, x, t, cond, prompts)
    rows = []
    for terms, scheme in VARIANTS:
        def g_field(xx, tt, x_hat=None):
            return algo.value_gradient(xx, tt, cond, prompts, None, x_hat=x_hat)

        def predictor(xx, tt):
            return one_step_prediction(xx, tt, model.velocity(xx, tt, cond))

        with torch.no_grad():
            r = consistency_residual(g_field, lambda xx, tt: model.base_velocity(xx, tt, cond), x, t, algo.beta,
                                     float(cfg.algo.fd_eps), float(cfg.algo.fd_delta), scheme,
                                     predictor=predictor, jvp=algo.network_jvp, spacetime=terms == "spacetime")
        err = (r.double() - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
        rows.append({"terms": terms, "scheme": scheme,
                     "total": ((r.double() - ref).norm() / ref.norm()).item(), "p95": err.quantile(0.95).item()})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.fd_accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--states", type=int, default=24)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. algo.fd_eps=1e-2 reward=digits_classifier")
    args = p.parse_args(argv)
    rows = measure(args.overrides, args.states)
    print(f"digits, fp32, {args.states} states, overrides: {' '.join(args.overrides) or 'none'}\n")
    print("| algo.fd_terms | algo.fd_scheme | ‖R − R_ref‖ / ‖R_ref‖ | per-state error, 95th percentile |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['terms']} | {r['scheme']} | {r['total']:.2e} | {r['p95']:.2e} |")


if __name__ == "__main__":
    main()
