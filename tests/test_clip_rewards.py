"""The SD3 CLIP rewards (aesthetic, hpsv2, pickscore) on tiny random models saved in the real formats
and loaded through the same code path as the real weights (no network)."""
from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from align.metrics.clip import ClipImageFeatures, clip_preprocess
from helpers.tiny_clip import write_aesthetic_head, write_tiny_hf_clip, write_tiny_open_clip

PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse at dusk", "a photo of a cat"]
ENV_VARS = ("ALIGN_AESTHETIC_CLIP_WEIGHTS", "ALIGN_AESTHETIC_HEAD_WEIGHTS", "ALIGN_HPSV2_WEIGHTS",
            "ALIGN_PICKSCORE_MODEL", "ALIGN_PICKSCORE_PROCESSOR", "ALIGN_CLIP_FEATURES_WEIGHTS")
# PIL resizes in two uint8 passes (each rounds, ≤ 0.5/255): 1/255 plus slack, in normalised units (÷ min std)
PIL_TOL = 1.1 / 255 / 0.26130258


@pytest.fixture(autouse=True)
def _no_weights_env(monkeypatch, tmp_path):
    """No weight env vars and an empty HF cache, so only what a test passes is found."""
    import huggingface_hub.constants as hfc

    for v in ENV_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_clip")
    l14_cfg, l14_w = write_tiny_open_clip(d, name="tiny-l14", seed=1, quick_gelu=True)
    h14_cfg, h14_w = write_tiny_open_clip(d, name="tiny-h14", seed=2, wrap_state_dict=True)
    return {
        "l14": (l14_cfg, l14_w),
        "hps": (h14_cfg, h14_w),
        "head": write_aesthetic_head(d / "aesthetic_head.pth"),
        "hf": write_tiny_hf_clip(d / "pickscore", logit_scale=2.5),
    }


def _aesthetic(tiny):
    from rewards.aesthetic import AestheticReward

    cfg, w = tiny["l14"]
    return AestheticReward(clip_model=cfg, clip_weights=w, head_weights=tiny["head"])


def _hps(tiny):
    from rewards.hpsv2 import HPSv2Reward

    cfg, w = tiny["hps"]
    return HPSv2Reward(version="v2.1", weights=w, clip_model=cfg)


def _pick(tiny):
    from rewards.pickscore import PickScoreReward

    return PickScoreReward(model=tiny["hf"], processor=tiny["hf"])


def _images(n, h, w, seed=0):
    """Random uint8-representable images: smooth structure plus pixel noise (worst case for overshoot)."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, max(h // 16, 2), max(w // 16, 2), generator=g), size=(h, w),
                      mode="bilinear", align_corners=False)
    x = torch.where(torch.rand(n, 1, h, w, generator=g) < 0.5, x, torch.rand(n, 3, h, w, generator=g))
    return (x * 255).round() / 255


def _to_pil(x):
    from PIL import Image

    return Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy())


# ---------------------------------------------------------------------------------------------- (1)
@pytest.mark.parametrize("hw", [(256, 256), (512, 512), (100, 100), (256, 320), (320, 256), (300, 500)])
def test_preprocess_matches_official_pil_pipelines(hw):
    """Tensor preprocessing vs open_clip's image_transform and transformers' CLIPImageProcessorPil."""
    from open_clip import image_transform
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    x = _images(2, *hw, seed=hw[0] + hw[1])
    ours = clip_preprocess(x)
    assert ours.shape == (2, 3, 224, 224) and ours.dtype == torch.float32
    oc, hf = image_transform(224, is_train=False), CLIPImageProcessorPil()
    ref_oc = torch.stack([oc(_to_pil(im)) for im in x])
    ref_hf = torch.from_numpy(np.asarray(hf([_to_pil(im) for im in x], return_tensors="pt")["pixel_values"]))
    for ref in (ref_oc, ref_hf):
        err = (ours - ref).abs()
        assert err.max() < PIL_TOL, f"max deviation {err.max():.4f} (normalised units) for {hw}"
        assert err.mean() < 0.006, f"mean deviation {err.mean():.5f} for {hw}"


def test_preprocess_identity_resize_and_normalisation():
    x = _images(1, 224, 224)
    m = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    s = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(clip_preprocess(x), (x - m) / s)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        clip_preprocess(torch.rand(2, 1, 8, 8))


# ---------------------------------------------------------------------------------------------- (2)
@pytest.mark.parametrize("which", ["aesthetic", "hpsv2", "pickscore"])
def test_gradients_reach_pixels(tiny, which):
    reward = {"aesthetic": _aesthetic, "hpsv2": _hps, "pickscore": _pick}[which](tiny)
    assert not any(p.requires_grad for p in reward.parameters()), "reward weights must be frozen"
    reward.train()  # a trainer may call .train() on everything: dropout in the aesthetic head must stay off
    assert not any(m.training for m in reward.modules())
    x = torch.rand(3, 3, 256, 256, requires_grad=True)
    r = reward(x, PROMPTS)
    assert r.shape == (3,) and r.dtype == torch.float32 and torch.isfinite(r).all()
    r.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0 and (x.grad.abs().flatten(1).sum(1) > 0).all(), "every image gets a gradient"


# ---------------------------------------------------------------------------------------------- (3)
def test_aesthetic_formula_against_hand_computation(tiny):
    import open_clip

    reward = _aesthetic(tiny)
    assert any(isinstance(m, open_clip.transformer.QuickGELU) for m in reward.modules()), "OpenAI CLIP uses quick_gelu"
    cfg, w = tiny["l14"]
    ref_model = open_clip.create_model(Path(cfg).stem, pretrained=w, force_quick_gelu=True).eval()
    x = _images(2, 256, 256)
    with torch.no_grad():
        e = ref_model.encode_image(clip_preprocess(x))
        e = e / e.norm(dim=-1, keepdim=True)
        sd = torch.load(tiny["head"], weights_only=True)
        h = e
        for k in (0, 2, 4, 6, 7):  # linear layers only: dropouts are identity in eval, no activations
            h = h @ sd[f"layers.{k}.weight"].T + sd[f"layers.{k}.bias"]
        got = reward(x, ["", ""])
    torch.testing.assert_close(got, h.squeeze(-1), rtol=1e-5, atol=1e-5)
    # the embedding is normalised before the head: a head fed the raw embedding would differ
    assert reward.clip(x).norm(dim=-1).sub(1).abs().max() < 1e-5


def test_hpsv2_formula_cosine_without_logit_scale(tiny):
    import open_clip

    reward = _hps(tiny)
    cfg, w = tiny["hps"]
    ref = open_clip.create_model(Path(cfg).stem, pretrained=w).eval()  # open_clip's own loader
    assert ref.logit_scale.exp().item() > 5, "the test needs a logit scale far from 1"
    tok = open_clip.get_tokenizer(Path(cfg).stem)
    x = _images(3, 320, 320, seed=3)
    with torch.no_grad():
        img_f, txt_f, _ = ref(clip_preprocess(x), tok(PROMPTS))  # open_clip returns normalised features
        expected = torch.diagonal(img_f @ txt_f.T)
        got = reward(x, PROMPTS)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert got.abs().max() <= 1 + 1e-6
    assert len(reward.text_cache) == 2, "repeated prompts are encoded once"
    reward.text_cache.clear()
    with torch.no_grad():
        torch.testing.assert_close(reward(x, PROMPTS), got)


def test_pickscore_formula_against_clipmodel_logits(tiny):
    from transformers import CLIPModel, CLIPTokenizer

    reward = _pick(tiny)
    ref = CLIPModel.from_pretrained(tiny["hf"]).eval()
    tok = CLIPTokenizer.from_pretrained(tiny["hf"])
    scale = ref.logit_scale.exp().item()
    assert abs(scale - np.exp(2.5)) < 1e-4
    x = _images(3, 288, 288, seed=4)
    t = tok(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = ref(input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=clip_preprocess(x))
        expected = torch.diagonal(out.logits_per_image)  # = exp(logit_scale) · cos(img, txt)
        got = reward(x, PROMPTS)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got.abs().max() <= scale + 1e-4
    # end to end against the official PIL processor on 224×224 images (no resize: identical inputs)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    x224 = _images(2, 224, 224, seed=5)
    pv = torch.from_numpy(np.asarray(CLIPImageProcessorPil()([_to_pil(i) for i in x224],
                                                             return_tensors="pt")["pixel_values"]))
    t2 = tok(PROMPTS[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref_scores = torch.diagonal(ref(**t2, pixel_values=pv).logits_per_image)
        torch.testing.assert_close(reward(x224, PROMPTS[:2]), ref_scores, rtol=1e-4, atol=1e-4)


def test_clip_image_features(tiny):
    cfg, w = tiny["l14"]
    f = ClipImageFeatures(model_name=cfg, weights=w)
    assert f.num_features == 16
    assert not any(p.requires_grad for p in f.parameters()) and not f.visual.training
    x = torch.rand(4, 3, 128, 160)
    feats = f(x)
    assert feats.shape == (4, 16) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(4))
    assert (feats[0] - feats[1]).abs().max() > 1e-4, "different images, different features"


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_open_clip_weights_from_torchscript_archive(tiny, tmp_path):
    """OpenAI's original ViT-L-14.pt is a TorchScript archive; a traced tiny model stands in for it."""
    import open_clip

    from align.metrics.clip import create_open_clip

    cfg, w = tiny["l14"]
    model = create_open_clip(cfg, w, quick_gelu=True)
    tok = open_clip.get_tokenizer(Path(cfg).stem)
    traced = torch.jit.trace(model, (torch.rand(1, 3, 224, 224), tok(["a cat"])), check_trace=False)
    traced.save(str(tmp_path / "tiny_openai.pt"))
    x = torch.rand(2, 3, 240, 240)
    with torch.no_grad():
        torch.testing.assert_close(ClipImageFeatures(cfg, str(tmp_path / "tiny_openai.pt"))(x),
                                   ClipImageFeatures(cfg, w)(x))


# ---------------------------------------------------------------------------------------------- (4)
def test_missing_weights_errors_name_file_key_and_env_var(tiny):
    from rewards.aesthetic import AestheticReward
    from rewards.hpsv2 import HPSv2Reward
    from rewards.pickscore import PickScoreReward

    cases = [
        (lambda: AestheticReward(clip_model=tiny["l14"][0], clip_weights=tiny["l14"][1]),
         ["sac+logos+ava1-l14-linearMSE.pth", "reward.head_weights", "ALIGN_AESTHETIC_HEAD_WEIGHTS",
          "improved-aesthetic-predictor"]),
        (lambda: AestheticReward(head_weights=tiny["head"]),
         ["open_clip_pytorch_model.bin", "reward.clip_weights", "ALIGN_AESTHETIC_CLIP_WEIGHTS",
          "timm/vit_large_patch14_clip_224.openai"]),
        (lambda: HPSv2Reward(version="v2.1"),
         ["HPS_v2.1_compressed.pt", "reward.weights", "ALIGN_HPSV2_WEIGHTS", "xswu/HPSv2"]),
        (lambda: HPSv2Reward(version="v2"), ["HPS_v2_compressed.pt", "ALIGN_HPSV2_WEIGHTS"]),
        (lambda: HPSv2Reward(version=2.1), ["HPS_v2.1_compressed.pt"]),  # a bare number from the CLI
        (lambda: PickScoreReward(), ["PickScore_v1", "reward.model", "ALIGN_PICKSCORE_MODEL",
                                     "yuvalkirstain/PickScore_v1"]),
        (lambda: PickScoreReward(model=tiny["hf"]),
         ["tokenizer", "reward.processor", "ALIGN_PICKSCORE_PROCESSOR", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"]),
        (lambda: HPSv2Reward(weights="/nonexistent/HPS_v2.1_compressed.pt"),
         ["/nonexistent/HPS_v2.1_compressed.pt", "reward.weights", "ALIGN_HPSV2_WEIGHTS"]),
        (lambda: ClipImageFeatures(), ["open_clip_pytorch_model.bin", "ALIGN_CLIP_FEATURES_WEIGHTS"]),
    ]
    for make, needles in cases:
        with pytest.raises(FileNotFoundError) as e:
            make()
        for n in needles:
            assert n in str(e.value), f"{n!r} missing from: {e.value}"


def test_weights_from_env_var_and_hf_cache(tiny, tmp_path, monkeypatch):
    import huggingface_hub.constants as hfc

    from rewards.hpsv2 import HPSv2Reward

    cfg, w = tiny["hps"]
    x = _images(1, 224, 224)
    with torch.no_grad():
        direct = HPSv2Reward(weights=w, clip_model=cfg)(x, PROMPTS[:1])
        monkeypatch.setenv("ALIGN_HPSV2_WEIGHTS", w)
        torch.testing.assert_close(HPSv2Reward(clip_model=cfg)(x, PROMPTS[:1]), direct)
        monkeypatch.delenv("ALIGN_HPSV2_WEIGHTS")
        # an HF-cache layout: models--xswu--HPSv2/{refs/main, snapshots/<rev>/HPS_v2.1_compressed.pt}
        repo = tmp_path / "hub" / "models--xswu--HPSv2"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("0123abcd")
        (repo / "snapshots" / "0123abcd").mkdir(parents=True)
        os.symlink(w, repo / "snapshots" / "0123abcd" / "HPS_v2.1_compressed.pt")
        monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hub"))
        torch.testing.assert_close(HPSv2Reward(clip_model=cfg)(x, PROMPTS[:1]), direct)
        with pytest.raises(FileNotFoundError, match="HPS_v2_compressed.pt"):
            HPSv2Reward(version="v2", clip_model=cfg)  # only v2.1 is in the cache


# ---------------------------------------------------------------------------------------------- (5)
@pytest.mark.parametrize("name", ["aesthetic", "hpsv2", "pickscore"])
def test_registry_and_typed_config(name):
    from align.setup.compose import compose_config
    from align.core.registry import REWARDS

    cls = REWARDS.get(name)
    assert cls.name == name and cls.domain == "sd3"
    cfg = compose_config([f"reward={name}"])                 # the reward's registered config dataclass
    assert cfg.model.name == "sd3" and cfg.reward.name == name and cfg.reward.dtype == "fp32"
    params = set(inspect.signature(cls.__init__).parameters) - {"self", "_"}
    unknown = set(cfg.reward.keys()) - {"name"} - params
    assert not unknown, f"{name}'s config has keys the constructor does not take: {unknown}"
    text = inspect.getsource(REWARDS.config(name))
    env = {"aesthetic": ["ALIGN_AESTHETIC_CLIP_WEIGHTS", "ALIGN_AESTHETIC_HEAD_WEIGHTS"],
           "hpsv2": ["ALIGN_HPSV2_WEIGHTS"], "pickscore": ["ALIGN_PICKSCORE_MODEL", "ALIGN_PICKSCORE_PROCESSOR"]}
    for v in env[name]:
        assert v in text, f"{name}'s config should say that {v} overrides the weights path"


def test_constructed_from_the_composed_config(tiny):
    """Each reward's config, with only its weight keys pointed at the tiny models, builds a working reward."""
    from align.setup.build import _kwargs
    from align.setup.compose import compose_config
    from align.core.registry import REWARDS

    overrides = {
        "aesthetic": {"clip_model": tiny["l14"][0], "clip_weights": tiny["l14"][1], "head_weights": tiny["head"]},
        "hpsv2": {"clip_model": tiny["hps"][0], "weights": tiny["hps"][1]},
        "pickscore": {"model": tiny["hf"], "processor": tiny["hf"]},
    }
    x = _images(2, 224, 224)
    for name, over in overrides.items():
        cfg = compose_config([f"reward={name}", *(f"reward.{k}='{v}'" for k, v in over.items())])
        reward = REWARDS.get(name)(**_kwargs(cfg.reward))
        with torch.no_grad():
            r = reward(x, PROMPTS[:2])
        assert r.shape == (2,) and torch.isfinite(r).all()


def test_text_feature_cache_encodes_each_prompt_once():
    from align.metrics.clip import TextFeatureCache

    calls = []

    def encode(ps):
        calls.append(list(ps))
        return torch.tensor([[float(len(p))] for p in ps])

    cache = TextFeatureCache(max_size=2)
    out = cache.get(["a", "bb", "a", "ccc"], encode, torch.device("cpu"))
    assert calls == [["a", "bb", "ccc"]] and out.squeeze(1).tolist() == [1.0, 2.0, 1.0, 3.0]
    assert len(cache) == 2  # oldest evicted after the batch was served
    cache.get(["ccc"], encode, torch.device("cpu"))
    assert len(calls) == 1
