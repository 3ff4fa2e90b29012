"""The paper's metrics: FID to an independent base sample set (eval.fid_reference), the
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

from align.setup.build import _kwargs, build_grid, build_model, build_reward
from align.setup.compose import compose_config
from align.train.evaluation import Evaluator
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
    cfg = compose_config(["model=digits", "sampler.steps=4", "algo.subsample_bins=4"])   # a valid run config
    model = build_model(cfg)
    reward = build_reward(cfg).requires_grad_(False).eval()
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
    assert "fid_reference" not in _kwargs(cfg.model)
    assert compose_config([f"model={model}", "eval.fid_reference=paired"]).eval.fid_reference == "paired"


def test_trainer_passes_fid_reference_to_the_evaluator(tmp_path):
    from align.setup.assemble import build_trainer

    fast = ["model=gmm", "reward=linear", "train.steps=1", "train.batch_size=4", "eval.n_samples=32",
            "eval.final_samples=4", "train.progress=false", "eval.fid_reference=independent"]
    run_dir = str(tmp_path / "run")
    assert build_trainer(compose_config(fast, run_dir=run_dir), run_dir).evaluator.fid_reference == "independent"


def test_a_run_saved_before_fid_reference_existed_still_matches_a_paired_rerun():
    from align.core.run_dir import config_differences

    new = {"model": {"name": "digits", "fid_reference": "paired"}, "eval": {"fid_reference": "paired", "every": 5}}
    old = {"model": {"name": "digits"}, "eval": {"every": 5}}
    assert config_differences(old, new) == []
    sd3 = {"model": {"name": "digits", "fid_reference": "independent"}, "eval": {"fid_reference": "independent",
                                                                              "every": 5}}
    # model.fid_reference is a retired key (the eval section's is the setting): only eval.fid_reference differs
    assert config_differences(old, sd3) == ["eval.fid_reference: saved 'paired', requested 'independent'"]


# ---- (c) cosine diversity in the paper's unit --------------------------------------------------------------
def _numpy_cosine_diversity(f: np.ndarray) -> float:
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    n = len(f)
    d = [1.0 - f[i] @ f[j] for i in range(n) for j in range(i + 1, n)]
    return 100.0 * float(np.mean(d))


def test_cosine_diversity_is_the_mean_pairwise_cosine_distance_times_100():
    from align.metrics.paper_metrics import cosine_diversity

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


# ---- (b) DreamSim features from local files -----------------------------------------------------------------
WIDTH, PROJ = 128, 32          # tiny ViT-B-shaped branches: 2 heads of 64 (ViT-B: 12), all real patch sizes


def _dreamsim_vit(patch_size, depth):
    from functools import partial

    from dreamsim.feature_extraction.vision_transformer import VisionTransformer

    return VisionTransformer(patch_size=patch_size, embed_dim=WIDTH, depth=depth, num_heads=WIDTH // 64,
                             mlp_ratio=4, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))


def _randomize(module, g):
    for p in module.parameters():
        p.data.add_(0.05 * torch.randn(p.shape, generator=g))


def _write_tiny_dreamsim(root, dreamsim_type, monkeypatch, seed=0):
    """DreamSim's cache-directory layout with tiny random branches, written and then loaded by the dreamsim
    package's own code (its loaders patched to the tiny ViT size only; peft writes the LoRA adapter)."""
    import dreamsim.feature_extraction.load_clip_as_dino as lcd
    import dreamsim.feature_extraction.load_open_clip_as_dino as locd
    from dreamsim.config import dreamsim_args
    from dreamsim.model import PerceptualModel
    from peft import LoraConfig, get_peft_model

    from align.metrics.dreamsim import DREAMSIM_TYPES

    g = torch.Generator().manual_seed(seed)
    branches, lora_dir = DREAMSIM_TYPES[dreamsim_type]
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    for b in branches:
        patch = int(b[-2:])
        if b == "dino_vitb16":
            vit = _dreamsim_vit(16, depth=12)          # DreamSim reads block 11
            _randomize(vit, g)
            torch.save(vit.state_dict(), root / "checkpoints" / "dino_vitbase16_pretrain.pth")
            head = {f"module.head.{k}": torch.zeros(2, 2) for k in
                    ("mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias",
                     "last_layer.weight")}
            torch.save({"student": head}, root / "dino_vitb16_pretrain.pth")   # DreamSim's DINO head (unused)
        else:
            vit = _dreamsim_vit(patch, depth=2)
            vit.pos_drop = torch.nn.LayerNorm(WIDTH)    # CLIP's ln_pre, as DreamSim's conversion stores it
            _randomize(vit, g)
            sd = vit.state_dict()
            sd["proj"] = torch.randn(WIDTH, PROJ, generator=g) / WIDTH ** 0.5
            torch.save({"state_dict": sd}, root / f"{b}_pretrain.pth.tar")
    tiny = lambda patch_size=16, **kw: _dreamsim_vit(patch_size, depth=2)   # noqa: E731
    monkeypatch.setattr(lcd, "vit_base", tiny)
    monkeypatch.setattr(locd, "vit_base", tiny)

    def hub_load(repo, name):                       # torch.hub's facebookresearch/dino from its cached checkpoint
        vit = _dreamsim_vit(16, depth=12)
        vit.load_state_dict(torch.load(root / "checkpoints" / "dino_vitbase16_pretrain.pth", weights_only=True))
        return vit

    monkeypatch.setattr(torch.hub, "load", hub_load)
    monkeypatch.setattr(torch.hub, "set_dir", lambda d: None)
    model = PerceptualModel(**dreamsim_args["model_config"][dreamsim_type], device="cpu", load_dir=str(root),
                            normalize_embeds=True)
    # LoRA on attention, MLP and the patch convolution (peft's Conv2d LoRA too)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none",
                                                  target_modules=["qkv", "attn.proj", "patch_embed.proj", "fc1", "fc2"]))
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            p.data.copy_(0.05 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(str(root / lora_dir))


@pytest.mark.parametrize("dreamsim_type", ["open_clip_vitb32", "clip_vitb32", "dino_vitb16", "ensemble"])
def test_dreamsim_features_equal_the_dreamsim_package_on_tiny_checkpoints(tmp_path, monkeypatch, dreamsim_type):
    pytest.importorskip("dreamsim")
    from dreamsim import dreamsim

    from align.metrics.features import build_features

    torch.set_num_threads(1)
    _write_tiny_dreamsim(tmp_path, dreamsim_type, monkeypatch)
    upstream, _ = dreamsim(pretrained=True, device="cpu", cache_dir=str(tmp_path), dreamsim_type=dreamsim_type)
    ours = build_features({"kind": "dreamsim", "weights": str(tmp_path), "dreamsim_type": dreamsim_type})
    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 224, 224, generator=g)
    with torch.no_grad():
        ref = upstream.embed(images)
        got = ours(images)
        # the DreamSim distance itself, pairwise, against our cosine diversity on our embeddings
        dist = [upstream(images[i:i + 1], images[j:j + 1]).item() for i in range(4) for j in range(i + 1, 4)]
    assert got.shape == ref.shape == (4, ours.num_features)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    from align.metrics.paper_metrics import cosine_diversity

    assert cosine_diversity(got) == pytest.approx(100 * float(np.mean(dist)), rel=1e-4)
    # the LoRA was merged: without it the embedding differs
    monkeypatch.setattr(type(ours), "_merge_lora", lambda self, d: None)
    plain = build_features({"kind": "dreamsim", "weights": str(tmp_path), "dreamsim_type": dreamsim_type})
    assert (plain(images) - got).abs().max() > 1e-3


def test_dreamsim_missing_weights_name_the_files_the_source_and_the_key(tmp_path, monkeypatch):
    from align.metrics.features import build_features

    monkeypatch.delenv("ALIGN_DREAMSIM_DIR", raising=False)
    for weights in (None, str(tmp_path)):
        with pytest.raises(FileNotFoundError) as err:
            build_features({"kind": "dreamsim", "weights": weights})
        msg = str(err.value)
        for part in ("clip_vitb16_pretrain.pth.tar", "open_clip_vitb16_pretrain.pth.tar",
                     "ensemble_lora/adapter_config.json", "checkpoints/dino_vitbase16_pretrain.pth",
                     "dreamsim_ensemble_checkpoint.zip", "dl.fbaipublicfiles.com/dino",
                     "model.features.weights", "ALIGN_DREAMSIM_DIR"):
            assert part in msg, (part, msg)
    with pytest.raises(ValueError, match="dreamsim_type"):
        build_features({"kind": "dreamsim", "weights": str(tmp_path), "dreamsim_type": "lpips"})
