"""Comparing two trainings that must give "the same update" computed in different orders (micro-batches, processes,
one image per pass): in float64, with a tolerance derived from the precision.

Why not float32: after AdamW steps, parameters amplify summation-order rounding without bound. One element's step is
lr·m̂/(√v̂ + ε); on the first step that is lr·g/(|g| + ε), whose derivative in g is ε/(|g| + ε)² ≤ 1/ε. So a gradient
difference δg moves an element by up to lr·δg/ε = 10⁶·δg at lr = 1e-2, ε = 1e-8. In float32, δg ≈ 1e-7 of the
gradient's scale (a few ulp of sums of O(1) terms): an element whose gradient is near zero moves by up to ±lr, in
either direction — a test fails by chance of the packages' kernels, not because the update is wrong.

In float64 the same bound holds with δg ≈ 1e-16 of the gradient's terms, or ≈ 1e-11 where a finite difference divides
network outputs by h = 3e-5 (VGG-Flow's residual; u·|f|/h ≈ 1.1e-16/3e-5, summed over a few hundred terms); over ≤ 3
updates at lr ≤ 1e-2 that is ≤ 3·10⁶·1e-11 = 3e-5: ``ATOL``. Measured with torch 2.14.1: ≤ 7.3e-8 for φ at h = 3e-5,
≤ 2.2e-9 for θ, ≤ 1e-15 without finite differences. A wrong split of the update (e.g. a micro-batch's own statistic in
place of the update's) moves parameters by 1e-3 and more; the tests check that training moved them that far."""
from __future__ import annotations

import torch

# Parameters of two float64 trainings of ≤ 3 AdamW updates at lr ≤ 1e-2 that differ only in summation order (the
# bound above; no relative part: near-zero elements are where the differences are).
ATOL = 3e-5
RTOL = 0.0


def to_fp64(*parts: torch.nn.Module) -> None:
    """Cast modules (model, reward, algorithm) to float64 in place; their Parameter objects stay the same, so an
    optimizer built over them keeps working."""
    for part in parts:
        part.double()


def assert_same_parameters(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Two float64 state dicts equal to ``ATOL`` (derivation above)."""
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert v.dtype == torch.float64 and b[k].dtype == torch.float64, (k, v.dtype, b[k].dtype)
        torch.testing.assert_close(b[k], v, rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{k}: {m}")


def build_fp64_trainer(cfg, run_dir: str):
    """``align.assemble.build_trainer`` with the model, reward and algorithm cast to float64 before the Trainer is
    made (so that a resumed run loads its float64 checkpoint without a round trip through float32), and x_0 drawn
    in float64 (the image backends keep trajectories in x_0's dtype)."""
    from unittest import mock

    import align.assemble as assemble

    build_parts, build_algorithm = assemble.build_parts, assemble.build_algorithm

    def parts(*args, **kwargs):
        built = build_parts(*args, **kwargs)
        to_fp64(built.model, built.reward)
        sample_noise = built.model.sample_noise
        built.model.sample_noise = lambda n, generator: sample_noise(n, generator).double()
        return built

    def algorithm(*args, **kwargs):
        built = build_algorithm(*args, **kwargs)
        to_fp64(built)
        return built

    with mock.patch.object(assemble, "build_parts", parts), mock.patch.object(assemble, "build_algorithm", algorithm):
        return assemble.build_trainer(cfg, run_dir)
