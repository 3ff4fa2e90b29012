"""VGG-Flow's training loss as the authors' code computes it, transcribed from their file, for comparison with
``algo=vggflow_authors`` (tests/test_vggflow_authors.py) and to measure what stays different on purpose
(``python -m experiments.authors_vggflow``: the table of docs/vggflow.md).

Source: lzzcd001/vggflow, ``train_vggflow.py`` at commit 978f1fb; line numbers below are that file's. The code works
in SD3's variables: σ = 1 − t, the transformer predicts u = −v at timestep τ = 1000σ. Here a flow model of this
project stands in for its transformer, so u(x, τ) = −v(x, 1 − τ/1000), and the value network N_φ (the code's
``value_net``, velocity units) is called at t = 1 − τ/1000. Everything else is the file's arithmetic, line by line,
with two switches for what ``algo=vggflow`` does differently on purpose:

* ``code_reward_gradients``: the finite-difference branches' reward gradients as the code takes them — the time
  branch differentiates r(x − σ'u(x', τ')) in x' through the transformer only (l. 812–820: −σ'J_uᵀ∇r, the identity
  part is lost), the x branch through the identity and the transformer (l. 866–896: (I − σJ_u)ᵀ∇r). Off: ∇r at
  x̂₁ in both, as g's definition (paper Eq. 16) and the main branch (l. 656–668) take it.
* ``detach_fd1_direction``: the code's J_{u_base}·∇V step x + ε∇V is not detached (l. 916–919: φ's gradient also
  flows through the base network's input); on, as the paper's Eq. 45 (∇̸[g]) and ``algo=vggflow``.

Not transcribed (they do not change the loss on these inputs): CFG (a flow without a condition here), bf16
autocast, the reward mask (off in run.sh), the U-Net regulariser (0 in run.sh).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

EPS_STEP = 1e-4        # l. 758
EPS_TIMESTEP = 1e-4    # l. 759, in τ = 1000σ units


@dataclass
class AuthorsTerms:
    """Per sub-sampled column j: loss_raw (matching), loss_consistency and loss_terminal, and the total of
    l. 936–941 (one micro-batch: accumulation_steps = the number of columns)."""
    raw: list[torch.Tensor]
    consistency: list[torch.Tensor]
    terminal: list[torch.Tensor]
    total: torch.Tensor


def _clip(rgrad: torch.Tensor, threshold: float) -> torch.Tensor:
    """l. 668–671: rgrad / (‖rgrad‖ + 1e-8) · min(‖rgrad‖, threshold), per sample."""
    norm = torch.linalg.norm(rgrad.reshape(rgrad.shape[0], -1), dim=1).view(-1, *([1] * (rgrad.dim() - 1)))
    return rgrad / (norm + 1e-8) * norm.clamp(max=threshold)


def authors_loss(model, reward, value_net, xs: torch.Tensor, ts: torch.Tensor, perms: torch.Tensor, beta: float,
                 alpha: float, threshold: float = 1.0, eta_mode: str = "linear", code_reward_gradients: bool = True,
                 detach_fd1_direction: bool = False) -> AuthorsTerms:
    """The loss of one micro-batch of trajectories ``xs`` [N + 1, B, ...] on the grid ``ts`` (t convention) at the
    sub-sampled grid indices ``perms`` [B, M] (the code's ``perms``, l. 535–560: N − 1 first, then one per bin).
    ``beta``: the code's ``reward_scale`` (``guidance_rexp``, l. 625); ``alpha``: ``coeff_terminal``."""
    def u_theta(x, tau):
        return -model.velocity(x, 1.0 - tau / 1000.0)

    def u_base(x, tau):
        return -model.base_velocity(x, 1.0 - tau / 1000.0)

    def value(x, tau):
        return value_net(x, 1.0 - tau / 1000.0, None)

    def eta(sigma):
        return {"linear": 1 - sigma, "constant": torch.ones_like(sigma), "quad": (1 - sigma).pow(2)}[eta_mode]

    def reward_grad(x_in, prediction):
        """∇ of Σ r(prediction(x_in)) w.r.t. x_in (l. 665, 820, 894)."""
        return torch.autograd.grad(reward(prediction(x_in), [""] * len(x_in)).sum(), x_in)[0].detach()

    def at_prediction(x_hat):
        """∇r at x̂₁ itself (the identity Jacobian of Eq. 16)."""
        x_hat = x_hat.detach().requires_grad_(True)
        return reward_grad(x_hat, lambda y: y)

    B, M = perms.shape
    rows = torch.arange(B)
    taus = 1000.0 * (1.0 - ts)                                       # sample["timesteps"]
    tau_last = taus[len(ts) - 2]                                     # scheduler.timesteps[-1]: the state x_{N−1}
    raw, consistency, terminal, total = [], [], [], 0.0
    for step in range(M):                                            # l. 619
        k = perms[:, step]
        xt = xs[k, rows].detach()                                    # l. 623
        tau = taus[k]
        sigma = (tau / 1000.0).view(-1, *([1] * (xt.dim() - 1)))     # l. 626 (sigmas[step_index] = τ / 1000)
        shape = sigma

        # main branch, l. 627–672: x̂₁ = x + (σ_last − σ)·sg(u), σ_last = 0, ∇r through the identity
        with torch.enable_grad():
            xinp = xt.detach().requires_grad_(True)
            noise_pred = u_theta(xinp, tau)
            rgrad = reward_grad(xinp, lambda x: x + (0.0 - sigma) * noise_pred.detach())
        rgrad = _clip(rgrad, threshold)

        # the matching target, l. 675–722, and loss_raw, l. 741–745
        with torch.no_grad():
            velocity_target_raw = u_base(xt, tau)
        velocity_target = velocity_target_raw - eta(sigma) * beta * rgrad
        value_correction = value(xt, tau)
        velocity_target = velocity_target + value_correction
        loss_raw = (noise_pred - velocity_target.detach()).pow(2).mean()

        # ∂_τ g, l. 760–839
        value_correction_tinc = value(xt, tau - EPS_TIMESTEP)
        nabla_V = value_correction / beta - eta(sigma) * rgrad
        tinc = tau - EPS_TIMESTEP
        tinc_scale = (tinc / 1000.0).view_as(shape)
        with torch.enable_grad():
            xinp_copy = xt.detach().requires_grad_(True)
            noise_pred_tinc = u_theta(xinp_copy, tinc)
            if code_reward_gradients:
                rgrad_tinc = reward_grad(xinp_copy, lambda _: xinp - tinc_scale * noise_pred_tinc)
            else:
                rgrad_tinc = at_prediction(xt - tinc_scale * noise_pred_tinc)
        rgrad_tinc = _clip(rgrad_tinc, threshold)
        nabla_V_tinc = value_correction_tinc / beta - eta(tinc_scale) * rgrad_tinc
        del_time = (nabla_V_tinc - nabla_V) / EPS_TIMESTEP

        # J_g along sg(u_base/β + ∇V), l. 843–912
        g_dir = (velocity_target_raw / beta + nabla_V).detach()      # detach_dir = True
        value_correction_xinc = value(xt + g_dir * EPS_STEP, tau)
        with torch.enable_grad():
            xinc = (xt + g_dir * EPS_STEP).detach().requires_grad_(True)
            noise_pred_xinc = u_theta(xinc, tau)
            if code_reward_gradients:
                rgrad_xinc = reward_grad(xinc, lambda x: x - sigma * noise_pred_xinc)
            else:
                rgrad_xinc = at_prediction(xinc - sigma * noise_pred_xinc)
        rgrad_xinc = _clip(rgrad_xinc, threshold)
        nabla_V_xinc_scaled = value_correction_xinc - eta(sigma) * beta * rgrad_xinc
        fd2 = (nabla_V_xinc_scaled - nabla_V * beta) / EPS_STEP

        # J_{u_base}·∇V, l. 915–923
        step_g = nabla_V.detach() if detach_fd1_direction else nabla_V
        with torch.enable_grad():
            vo_inc = u_base(xt + step_g * EPS_STEP, tau)
        fd1 = (vo_inc - velocity_target_raw) / EPS_STEP

        loss_consistency = ((del_time - fd1 - fd2) / beta).pow(2).mean()      # l. 926

        # the boundary on the rows whose state in this column is x_{N−1}, l. 929–936
        end_mask = (tau == tau_last).to(xt.dtype)
        per_row = value_correction.pow(2).reshape(B, -1).mean(1)
        loss_terminal = (per_row * end_mask).sum() / (end_mask.sum() + 1e-6)

        raw.append(loss_raw)
        consistency.append(loss_consistency)
        terminal.append(loss_terminal)
        total = total + loss_raw + loss_consistency + loss_terminal * alpha
    return AuthorsTerms(raw, consistency, terminal, total / M)     # l. 941: accumulation_steps = 1 × M


# ---- what stays different on purpose, measured --------------------------------------------------------------
def _setup(seed: int = 0, beta: float = 2.0, alpha: float = 10.0, batch: int = 8):
    """A float64 Gaussian-mixture flow with a perturbed residual (θ) and value network (φ), a quadratic reward,
    ``algo=vggflow_authors`` on it, a rollout and its sub-sampled indices."""
    from align.setup.compose import compose_config
    from align.core.registry import ALGORITHMS, MODELS, REWARDS

    cfg = compose_config(["algo=vggflow_authors", "model=gmm", "reward=quadratic", "reward.center=[1.0,0.5]",
                          "reward.precision=[[1.0,0.3],[0.3,0.6]]", f"algo.beta={beta}", f"algo.alpha={alpha}",
                          "model.hidden=16", "model.depth=2", "sampler.steps=20"])
    torch.manual_seed(seed)
    model = MODELS.get("gmm")(**{k: cfg.model[k] for k in ("weights", "means", "covs", "hidden", "depth")}).double()
    reward = REWARDS.get("quadratic")(center=list(cfg.reward.center),
                                      precision=[list(r) for r in cfg.reward.precision]).double()
    from samplers import uniform_grid

    ts = uniform_grid(20).double()
    algo = ALGORITHMS.get("vggflow_authors")(cfg.algo, model, reward, ts).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*model.trainable_parameters(), *algo.value_net.parameters()]:
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    x0 = torch.randn(batch, 2, generator=gen, dtype=torch.float64)
    traj = algo.rollout(x0, [""] * batch, None, gen)
    algo.prepare([traj], gen, gather=lambda n: n)
    return model, reward, algo, traj


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, allow_unused=False)])


def departures(seeds=(0, 1, 2)) -> dict[str, dict[str, float]]:
    """For each switch: the consistency loss's ratio to the one without it, and the cosine between φ's gradients
    (θ's do not depend on the consistency term), over ``seeds``."""
    out: dict[str, dict[str, list[float]]] = {}
    for seed in seeds:
        model, reward, algo, traj = _setup(seed)
        perms = traj.extras["vgg_idx"]
        phi = list(algo.value_net.parameters())
        args = (model, reward, algo.value_net, traj.xs, traj.ts, perms, algo.beta, algo.alpha)
        ours = authors_loss(*args, code_reward_gradients=False, detach_fd1_direction=True)
        ours_cons = sum(ours.consistency)
        ours_g = _grads(ours_cons, phi)
        for name, flags in {"reward gradients in the FD branches": dict(code_reward_gradients=True,
                                                                         detach_fd1_direction=True),
                            "J_u_base·∇V step not detached": dict(code_reward_gradients=False,
                                                                  detach_fd1_direction=False)}.items():
            theirs = authors_loss(*args, **flags)
            cons = sum(theirs.consistency)
            g = _grads(cons, phi)
            row = out.setdefault(name, {"loss ratio": [], "phi-gradient cosine": []})
            row["loss ratio"].append(float((cons / ours_cons).detach()))
            row["phi-gradient cosine"].append(float(torch.nn.functional.cosine_similarity(g, ours_g, dim=0)))
    return {name: {k: (min(v), max(v)) for k, v in row.items()} for name, row in out.items()}


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    torch.set_num_threads(1)
    for name, row in departures().items():
        print(f"| {name} | " + " | ".join(f"{k}: {lo:.3g} … {hi:.3g}" for k, (lo, hi) in row.items()) + " |")


if __name__ == "__main__":
    main()
