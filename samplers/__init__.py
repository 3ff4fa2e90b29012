"""Time grids, the Euler ODE sampler with trajectory capture, and the memoryless SDE sampler.

Everything here speaks the paper's convention: t in [0, 1], t = 0 noise, t = 1 data, dx/dt = v(x, t).
"""
from samplers.time_grid import make_grid, sd3_grid, training_grid, uniform_grid
from samplers.convention import one_step_prediction
from samplers.euler import Trajectory, euler_integrate
from samplers.memoryless_sde import memoryless_sde_integrate, memoryless_noise_level, memoryless_drift

__all__ = [
    "make_grid", "sd3_grid", "training_grid", "uniform_grid", "one_step_prediction", "Trajectory", "euler_integrate",
    "memoryless_sde_integrate", "memoryless_noise_level", "memoryless_drift",
]
