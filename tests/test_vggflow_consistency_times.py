"""VGG-Flow's value network between grid times (algo.consistency_times). The gradient-HJB residual enforced only
at the grid states leaves ν_φ free between them; on SD3's shifted grid (late steps 0.73 → 0.85 → 0.99) the trained
model then misses its own continuous-time target. Enforced inside each Euler step it lands on it. VGG-Flow-PMP's
fixed point is the optimum discretised on its training grid (algo.train_grid): on SD3's grid, training on a uniform
grid lands closer to the continuous-time optimum than training on the sampler's grid.

Reference, independent of the algorithm: one Gaussian N(μ, Σ) with Σ diagonal and r = cᵀx. The base velocity is
affine with the x-independent Jacobian A_t = ½ Ċ_t C_t⁻¹ (C_t = t²Σ + (1 − t)²I), so the costate is
a(t) = −Φ(1, t)ᵀc with Φ(1, t) = C_1^{1/2} C_t^{−1/2}, and the continuous-time optimal control is
ṽ*(t) = β Φ(1, t)ᵀ c (reference §6.1, §6.3). Its samples: the sampler's Euler ODE with v_base + ṽ*(t_k) from the
same noise as samples_final.pt."""
import pytest
import torch

from align.setup.compose import compose_config
from align.setup.assemble import build_trainer
from align.train.trainer import Trainer

torch.set_num_threads(1)

MU, VAR, C, BETA = [0.5, -0.5], [0.25, 2.0], [1.0, 1.0], 1.0


def _train(tmp_path, times: str, algo: tuple[str, ...] = ("algo=vggflow",)) -> tuple[Trainer, dict]:
    ov = ["model=gmm", "reward=linear", f"reward.direction={C}", "model.weights=[1.0]", f"model.means=[{MU}]",
          f"model.covs=[[[{VAR[0]},0.0],[0.0,{VAR[1]}]]]", "sampler.grid=sd3", "sampler.steps=20",
          f"algo.beta={BETA}", "train.steps=300", "train.progress=false", "eval.every=0", "eval.n_samples=32",
          "eval.final_samples=400", "eval.batch_size=400", "train.checkpoint_every=300", "seed=0", *algo]
    if algo == ("algo=vggflow",):
        ov.append(f"algo.consistency_times={times}")
    run_dir = str(tmp_path / times)
    trainer = build_trainer(compose_config(ov, run_dir), run_dir)
    trainer.train()
    return trainer, torch.load(tmp_path / times / "samples_final.pt")


def _continuous_optimum_samples(trainer: Trainer, x0: torch.Tensor) -> torch.Tensor:
    var, c = torch.tensor(VAR, dtype=torch.float64), torch.tensor(C, dtype=torch.float64)
    x = x0.double()
    ts = trainer.ts
    for k in range(len(ts) - 1):
        t = float(ts[k])
        C_t, C_1 = t ** 2 * var + (1 - t) ** 2, var
        v_star = BETA * (C_1 / C_t).sqrt() * c
        tt = torch.full((len(x),), t, dtype=x.dtype)
        with torch.no_grad():
            v = trainer.model.base_velocity(x.to(x0.dtype), tt.to(x0.dtype)).double()
        x = x + float(ts[k + 1] - ts[k]) * (v + v_star)
    return x


@pytest.mark.slow
def test_within_step_residual_reaches_the_continuous_optimum_on_the_sd3_grid(tmp_path):
    rms = {}
    for times in ("within_step", "grid"):
        trainer, final = _train(tmp_path, times)
        ref = _continuous_optimum_samples(trainer, final["x0"])
        rms[times] = (final["x1"].double() - ref).pow(2).sum(1).mean().sqrt().item()
    print("paired RMS to the continuous-time optimum:", rms)
    assert rms["within_step"] < 0.06
    assert rms["grid"] > 0.3          # the paper's grid-only residual misses it on this grid


@pytest.mark.slow
def test_pmp_trained_on_a_uniform_grid_lands_closer_to_the_continuous_optimum_on_the_sd3_grid(tmp_path):
    """Measured (paired RMS): 0.171 trained on the sampler's grid, 0.083 on the uniform one (whose own discrete
    optimum is first-order short of the continuous one, docs/exact_targets.md), at lr 3e-3 (and 1e-3)."""
    rms = {}
    for grid in ("model", "uniform"):
        trainer, final = _train(tmp_path, grid, ("algo=vggflow_pmp", f"algo.train_grid={grid}", "train.lr=3e-3"))
        assert trainer.algo.train_ts.shape == trainer.ts.shape          # the same cost per update
        ref = _continuous_optimum_samples(trainer, final["x0"])
        rms[grid] = (final["x1"].double() - ref).pow(2).sum(1).mean().sqrt().item()
    print("VGG-Flow-PMP, paired RMS to the continuous-time optimum:", rms)
    assert rms["uniform"] < 0.6 * rms["model"] and rms["model"] > 0.1
