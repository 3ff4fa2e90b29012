"""``python -m experiments.reference_departures``: the size of Adjoint Matching's and DRaFT-LV's departures from
their reference code (docs/adjoint_matching.md, docs/draft.md), on a float64 Gaussian-mixture flow with a perturbed
residual and a quadratic reward, seeds 0–2:

* Adjoint Matching vs microsoft/soc-fine-tuning-sd (``src/trainers/am_trainer.py``):
  (a) the lean adjoint through our last step, a noiseless Euler step with v_base (its Jacobian), against the
      reference's memoryless SDE to the end (b_base's Jacobian there too): relative distance of the adjoint states;
  (b) X_k paired with ã_{k+1} (ours) against ã_k (the reference): cosine of θ's gradients;
  (c) each time weighted by Δt_k (``time_weight=dt``, the reference's δ) against alike (``uniform``), training on the
      sampler's grid (``train_grid=model``): cosine of θ's gradients.
* DRaFT-LV: the n re-noised copies (the DRaFT paper's estimator) against RuoyuWang-2077/FlowBP's n + 1 rows with the
  un-noised last step (``lv_include_last``): relative distance of θ's gradients.
"""
from __future__ import annotations

import argparse

import torch
from omegaconf import OmegaConf

GRIDS = ("uniform", "sd3")


def _model(seed: int):
    from align.models.gmm import GaussianMixtureFlow
    from rewards.analytic import QuadraticReward

    torch.manual_seed(seed)
    model = GaussianMixtureFlow(weights=[0.4, 0.6], means=[[-1.0, 0.5], [1.2, -0.3]],
                                covs=[[[0.5, 0.1], [0.1, 0.8]]] * 2, hidden=16, depth=2).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    reward = QuadraticReward(center=[0.5, 1.0], precision=[[1.0, 0.2], [0.2, 2.0]]).double()
    return model, reward, gen


def _grid(name: str, n: int = 10) -> torch.Tensor:
    from samplers import sd3_grid, uniform_grid

    return uniform_grid(n) if name == "uniform" else sd3_grid(n).double()


def _am(model, reward, grid, **kw):
    from algorithms.adjoint_matching import AdjointMatching

    cfg = OmegaConf.create({"name": "adjoint_matching", "lr": 1e-4, "beta": 1.0, "h": None, "train_grid": "model",
                            "train_steps": None, "loss_times": {"last": 1.0, "random": 0.0}, "loss_clip": None, **kw})
    return AdjointMatching(cfg, model, reward, grid)


def _theta_grad(loss: torch.Tensor, model) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.trainable_parameters()))])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def am_adjoint_distance(seed: int, grid_name: str) -> float:
    """(a): max over k ≥ 1 of ‖ã_k − ã_k^ref‖ / ‖ã_k^ref‖, ã^ref through b_base at every step, on one trajectory."""
    from samplers import memoryless_drift

    model, reward, gen = _model(seed)
    grid = _grid(grid_name)
    algo = _am(model, reward, grid)
    traj = algo.rollout(torch.randn(16, 2, generator=gen, dtype=torch.float64), [""] * 16, None, gen)
    ours = algo.sweep(traj).costates
    N = traj.n_steps
    a = ours[N].clone()                                     # ã_N = −β ∇r(X_N), the same in both
    worst = 0.0
    for k in range(N - 1, 0, -1):
        x = traj.xs[k].detach().requires_grad_(True)
        t = grid[k].expand(len(x))
        drift = memoryless_drift(model.base_velocity(x, t), x, float(grid[k]), algo.h)
        (vjp,) = torch.autograd.grad((a * drift).sum(), x)
        a = a + (grid[k + 1] - grid[k]) * vjp
        worst = max(worst, float((ours[k] - a).norm() / a.norm()))
    return worst


def am_gradient_cosines(seed: int) -> dict[str, float]:
    """(b) on the uniform grid and (c) on SD3's: θ-gradient cosines."""
    from samplers import memoryless_noise_level

    out = {}
    model, reward, gen = _model(seed)
    grid = _grid("uniform")
    algo = _am(model, reward, grid)
    traj = algo.rollout(torch.randn(16, 2, generator=gen, dtype=torch.float64), [""] * 16, None, gen)
    a = algo.sweep(traj).costates
    losses = {}
    for name, shift in (("next", 1), ("same", 0)):
        total = 0.0
        for k in range(1, traj.n_steps):
            x, t = traj.xs[k].detach(), grid[k].expand(16)
            sigma = memoryless_noise_level(grid[k], algo.h)
            u = (2.0 / sigma) * (model.velocity(x, t) - model.base_velocity(x, t))
            total = total + (u + sigma * a[k + shift].detach()).pow(2).mean()
        losses[name] = total
    out["(b) pairing ã_k vs ã_{k+1}, uniform grid"] = _cos(_theta_grad(losses["next"], model),
                                                           _theta_grad(losses["same"], model))
    grid = _grid("sd3")
    by_dt, alike = _am(model, reward, grid), _am(model, reward, grid, time_weight="uniform")
    traj = by_dt.rollout(torch.randn(16, 2, generator=gen, dtype=torch.float64), [""] * 16, None, gen)
    out["(c) Δt_k weights vs alike, SD3's grid"] = _cos(_theta_grad(by_dt.loss(traj, torch.Generator())[0], model),
                                                        _theta_grad(alike.loss(traj, torch.Generator())[0], model))
    return out


def draft_lv_distance(seed: int, n: int = 2) -> float:
    """‖g_FlowBP − g_ours‖ / ‖g_ours‖ for θ's gradient of one DRaFT-LV loss on the same trajectories and noise."""
    from algorithms.draft import DRaFT

    model, reward, gen = _model(seed)
    grid = _grid("sd3")

    def algo(include):
        cfg = OmegaConf.create({"name": "draft", "lr": 1e-4, "variant": "lv", "n": n, "lv_include_last": include,
                                "objective": "raw"})
        return DRaFT(cfg, model, reward, grid)

    ours = algo(False)
    traj = ours.rollout(torch.randn(16, 2, generator=gen, dtype=torch.float64), [""] * 16, None, gen)
    state = gen.get_state()
    g0 = _theta_grad(ours.loss(traj, torch.Generator().set_state(state))[0], model)
    g1 = _theta_grad(algo(True).loss(traj, torch.Generator().set_state(state))[0], model)
    return float((g1 - g0).norm() / g0.norm())


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    torch.set_num_threads(1)
    seeds = (0, 1, 2)
    rows: dict[str, list[float]] = {}
    for seed in seeds:
        for grid in GRIDS:
            rows.setdefault(f"(a) adjoint states, {grid} 10-step grid", []).append(am_adjoint_distance(seed, grid))
        for k, v in am_gradient_cosines(seed).items():
            rows.setdefault(k, []).append(v)
        rows.setdefault("DRaFT-LV: FlowBP's n + 1 rows vs n (n = 2), θ-gradient distance", []).append(
            draft_lv_distance(seed))
    for name, values in rows.items():
        print(f"{name}: {min(values):.3g} … {max(values):.3g}")


if __name__ == "__main__":
    main()
