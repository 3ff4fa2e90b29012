"""Comparing two trainings that must give "the same update" computed in different orders (micro-batches, processes,
one image per pass): in float64, with AdamW made linear in the gradient, so that the tolerance follows from the
precision.

Why not the defaults: AdamW's step lr·m̂/(√v̂ + ε) is, on the first update, lr·g/(|g| + ε), whose slope in g is
ε/(|g| + ε)² — up to 1/ε = 10⁸. A gradient element near zero turns a rounding difference δg into a parameter
difference of up to lr·δg/ε (a full ±lr in float32, where δg ≈ 1e-7 of the gradient's scale): a test then fails by
chance of the packages' kernels, not because the update is wrong.

``LINEAR_ADAM`` sets ε = 1. The trainer clips each group's gradient norm to train.grad_clip = 1, so |g| ≤ 1, √v̂ ≤ 1,
and the step lr·m̂/(√v̂ + 1) has a slope ≤ lr in every gradient element (AdamW is SGD with momentum and a
per-element gain in (½, 1]). Two trainings whose gradients differ by δg then differ after k updates by at most
k·lr·δg (plus the second-order effect of the first update's difference on the next gradient, δθ·‖∇²L‖, of the same
order). In float64, δg ≤ n·u·Σ|terms| with u = 1.1e-16 and n ≤ 10³ rounding steps, divided by h ≥ 3e-5 where a finite
difference of network outputs enters (VGG-Flow's residual): δg ≤ 10³·1.1e-16/3e-5 ≈ 4e-9 of the gradient's O(1)
terms. Over k ≤ 3 updates at lr ≤ 1e-2 that is ≤ 3·1e-2·4e-9 ≈ 1e-10: ``ATOL`` (measured with torch 2.14.1:
≤ 1.4e-14 in every comparison of the tests, VGG-Flow's φ included). A wrong split of the update (e.g. a
micro-batch's own statistic in place of the update's) changes the gradient by O(1) relative, the parameters by about
lr·|g|; each test also checks that training moved the parameters far beyond ``ATOL``."""
from __future__ import annotations

import torch

# AdamW linear in the gradient (see above); add to the overrides of both trainings
LINEAR_ADAM = "train.adam_eps=1.0"
# Parameters of two float64 trainings under LINEAR_ADAM, ≤ 3 updates at lr ≤ 1e-2, that differ only in the order
# their gradients were summed (the bound above; no relative part: the bound is absolute)
ATOL = 1e-10
RTOL = 0.0


def to_fp64(*parts: torch.nn.Module) -> None:
    """Cast modules (model, reward, algorithm) to float64 in place; their Parameter objects stay the same, so an
    optimizer built over them keeps working."""
    for part in parts:
        part.double()


def assert_same_parameters(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Two float64 state dicts, trained under ``LINEAR_ADAM``, equal to ``ATOL`` (derivation above)."""
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert v.dtype == torch.float64 and b[k].dtype == torch.float64, (k, v.dtype, b[k].dtype)
        torch.testing.assert_close(b[k], v, rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{k}: {m}")


def build_fp64_trainer(cfg, run_dir: str):
    """``align.setup.assemble.build_trainer`` with the model, reward and algorithm cast to float64 before the Trainer is
    made (so that a resumed run loads its float64 checkpoint without a round trip through float32), and x_0 drawn
    in float64 (the image backends keep trajectories in x_0's dtype)."""
    from unittest import mock

    import align.setup.assemble as assemble

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


def build_linear_fp64_trainer(cfg, run_dir: str):
    """``build_fp64_trainer`` for a comparison with ``assert_same_parameters``: the config must ask for
    ``LINEAR_ADAM`` (and keep the gradient clip at 1), or the tolerance does not follow."""
    assert float(cfg.train.adam_eps) >= 1.0 and float(cfg.train.grad_clip) <= 1.0, (cfg.train.adam_eps,
                                                                                   cfg.train.grad_clip)
    return build_fp64_trainer(cfg, run_dir)
