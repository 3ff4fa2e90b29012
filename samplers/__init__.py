"""Time grids, the Euler ODE sampler with trajectory capture, the memoryless SDE sampler and Flow-GRPO's SDE.

Everything here speaks the paper's convention: t in [0, 1], t = 0 noise, t = 1 data, dx/dt = v(x, t).
"""
from samplers.time_grid import dynamic_shift_mu, flux_grid, make_grid, sd3_grid, training_grid, uniform_grid
from samplers.convention import one_step_prediction
from samplers.euler import Trajectory, euler_integrate
from samplers.memoryless_sde import memoryless_sde_integrate, memoryless_noise_level, memoryless_drift
from samplers.flow_sde import (SDERollout, flow_sde_integrate, flow_sde_noise_level, flow_sde_step_mean,
                               flow_sde_step_std, flow_sde_step_stds, gaussian_kl_same_std, gaussian_log_prob)

__all__ = [
    "dynamic_shift_mu", "flux_grid", "make_grid", "sd3_grid", "training_grid", "uniform_grid", "one_step_prediction", "Trajectory", "euler_integrate",
    "memoryless_sde_integrate", "memoryless_noise_level", "memoryless_drift",
    "SDERollout", "flow_sde_integrate", "flow_sde_noise_level", "flow_sde_step_mean", "flow_sde_step_std",
    "flow_sde_step_stds", "gaussian_kl_same_std", "gaussian_log_prob",
]
