"""The paper's metrics (issue 11, point 5): FID to an independent base sample set (eval.fid_reference), the
cosine diversity in the paper's ×10⁻² unit, and DreamSim features from local files.

Expected values come from independent computations: numpy/scipy's Fréchet distance (scipy.linalg.sqrtm) on
features computed here straight from the model, numpy's pairwise cosine distances, and (when the ``dreamsim``
package is installed) DreamSim's own ``PerceptualModel`` + peft on the same tiny checkpoint files.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from align.build import RUNNER_KEYS, _kwargs, build_model, build_reward, build_grid
from align.config import compose_config
from align.evaluation import Evaluator
from samplers import euler_integrate

N, GROUP = 32, 16                      # two prompts × 16 samples: the paper's 16-sample per-prompt FID


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^{1/2}) with unbiased covariances, by scipy's matrix square root."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(sa @ sb)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.trace(covmean).real)


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    cfg = compose_config(["model=digits", "sampler.steps=4"])
    model = build_model(cfg)
    reward = build_reward(cfg, model).requires_grad_(False).eval()
    return cfg, model, reward, build_grid(cfg)


def _evaluator(digits, fid_reference):
    cfg, model, reward, ts = digits
    return Evaluator(model, reward, ts, ["three", "seven"], N, GROUP, seed=5, fid_reference=fid_reference)


def _features_from(model, ts, noise, prompts):
    """Base-model features of the samples from ``noise``, computed here (no Evaluator code)."""
    with torch.no_grad():
        cond = model.encode(prompts)
        x1 = euler_integrate(lambda x, t: model.base_velocity(x, t, cond), noise, ts, record=False)
        return model.features(x1).double().numpy()


def test_independent_fid_of_the_base_model_is_scipys_frechet_distance_to_fresh_base_samples(digits):
    _, model, _, ts = digits
    ev = _evaluator(digits, "independent")
    ref_noise = ev.reference_noise()
    assert ref_noise.shape == ev.noise.shape and not torch.allclose(ref_noise, ev.noise)   # a disjoint draw
    assert torch.equal(ref_noise, _evaluator(digits, "independent").reference_noise())    # and a fixed one
    metrics, _ = ev()                                            # step 0: the finetuned model is the base
    a = _features_from(model, ts, ev.noise, ev.prompts)          # the evaluated samples
    b = _features_from(model, ts, ref_noise, ev.prompts)         # the independent reference set
    expected = np.mean([_scipy_fid(a[i:i + GROUP], b[i:i + GROUP]) for i in range(0, N, GROUP)])
    assert metrics["eval/fid"] > 1.0                             # the paper's Base row is not 0
    assert metrics["eval/fid"] == pytest.approx(expected, rel=2e-3)
    cached = ev._reference
    assert ev()[0]["eval/fid"] == metrics["eval/fid"] and ev._reference is cached      # sampled once per run


def test_paired_fid_of_the_base_model_stays_zero(digits):
    metrics, _ = _evaluator(digits, "paired")()
    assert metrics["eval/fid"] < 1e-6


def test_unknown_fid_reference_is_refused(digits):
    with pytest.raises(ValueError, match="fid_reference"):
        _evaluator(digits, "both")


@pytest.mark.parametrize("model,expected", [("sd3", "independent"), ("digits", "paired"), ("gmm", "paired")])
def test_fid_reference_default_per_model_and_not_a_constructor_argument(model, expected):
    cfg = compose_config([f"model={model}"])
    assert cfg.eval.fid_reference == expected
    assert "fid_reference" in RUNNER_KEYS and "fid_reference" not in _kwargs(cfg.model, RUNNER_KEYS)
    assert compose_config([f"model={model}", "eval.fid_reference=paired"]).eval.fid_reference == "paired"


def test_trainer_passes_fid_reference_to_the_evaluator(tmp_path):
    from align.trainer import Trainer

    fast = ["model=gmm", "reward=linear", "train.steps=1", "train.batch_size=4", "eval.n_samples=32",
            "eval.final_samples=4", "train.progress=false", "eval.fid_reference=independent"]
    run_dir = str(tmp_path / "run")
    assert Trainer(compose_config(fast, run_dir=run_dir), run_dir).evaluator.fid_reference == "independent"


def test_a_run_saved_before_fid_reference_existed_still_matches_a_paired_rerun():
    from align.run import config_differences

    new = {"model": {"name": "digits", "fid_reference": "paired"}, "eval": {"fid_reference": "paired", "every": 5}}
    old = {"model": {"name": "digits"}, "eval": {"every": 5}}
    assert config_differences(old, new) == []
    sd3 = {"model": {"name": "digits", "fid_reference": "independent"}, "eval": {"fid_reference": "independent",
                                                                              "every": 5}}
    assert len(config_differences(old, sd3)) == 2


# ---- (c) cosine diversity in the paper's unit --------------------------------------------------------------
def _numpy_cosine_diversity(f: np.ndarray) -> float:
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    n = len(f)
    d = [1.0 - f[i] @ f[j] for i in range(n) for j in range(i + 1, n)]
    return 100.0 * float(np.mean(d))


def test_cosine_diversity_is_the_mean_pairwise_cosine_distance_times_100():
    from align.metrics import cosine_diversity

    g = torch.Generator().manual_seed(0)
    f = torch.randn(16, 24, generator=g, dtype=torch.float64) * 3 + 1
    assert cosine_diversity(f) == pytest.approx(_numpy_cosine_diversity(f.numpy()), rel=1e-12)
    assert cosine_diversity(torch.ones(4, 3)) == pytest.approx(0.0, abs=1e-12)
    # antipodal pairs: distance 2 → 200 in units of 1e-2
    assert cosine_diversity(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(200.0)


def test_evaluator_logs_cosine_diversity_per_prompt_group(digits):
    _, model, _, ts = digits
    ev = _evaluator(digits, "paired")
    metrics, x1 = ev()
    a = _features_from(model, ts, ev.noise, ev.prompts)
    expected = np.mean([_numpy_cosine_diversity(a[i:i + GROUP]) for i in range(0, N, GROUP)])
    assert metrics["eval/diversity_cos"] == pytest.approx(expected, rel=1e-6)
    assert 0.0 < metrics["eval/diversity_cos"] < 200.0
