"""Library versions on the SD3 loading path (tiny random SD3, tests/helpers/tiny_sd3.py): the dtype keyword each
installed diffusers / transformers reads, errors from an incompatible library not reported as missing weights,
adapter metadata that any peft can read, TF32 on CUDA only.

Older libraries cannot be installed beside ours in a test, so their documented behaviour is reproduced at the one
place it matters (``from_pretrained``'s keywords): diffusers < 0.40 does not read ``dtype`` (the model loads in
fp32), transformers < 4.56 raises on it (``TypeError: ... unexpected keyword argument 'dtype'``).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from align.models.flow_transformer import LORA_WEIGHT_NAME
from align.core.loading import LibraryLoadError
from align.core.registry import MODELS
from align.core.weights import WeightsError
from helpers.tiny_sd3 import RESOLUTION, build_tiny_sd3


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> str:
    return build_tiny_sd3(str(tmp_path_factory.mktemp("tiny_sd3_versions")), t5=True)


def _model(path: str, **kw):
    torch.set_num_threads(1)
    args = dict(pretrained=path, dtype="bfloat16", resolution=RESOLUTION, decoder="vae", t5=True,
                features={"kind": "pixels"}, keep_text_encoders=True, encode_device="cpu")
    args.update(kw)
    torch.manual_seed(0)
    return MODELS.get("sd3")(**args)


def _dtypes(model) -> dict[str, torch.dtype]:
    enc = model._text.encoders
    return {"transformer": model.transformer.dtype, "clip_l": enc[0].dtype, "clip_g": enc[1].dtype,
            "t5": enc[2].dtype, "vae": next(model.decoder.parameters()).dtype}


EXPECTED = {"transformer": torch.bfloat16, "clip_l": torch.bfloat16, "clip_g": torch.bfloat16, "t5": torch.bfloat16,
            "vae": torch.float32}


def _as_old_diffusers(monkeypatch):
    """diffusers 0.3x: ``from_pretrained`` takes ``torch_dtype``; an unknown ``dtype`` is not read (fp32)."""
    import diffusers
    from diffusers.models.modeling_utils import ModelMixin

    monkeypatch.setattr(diffusers, "__version__", "0.35.2")
    original = ModelMixin.from_pretrained.__func__
    seen = []

    def old_from_pretrained(cls, *args, **kwargs):
        seen.append(sorted(k for k in kwargs if "dtype" in k))
        kwargs.pop("dtype", None)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(ModelMixin, "from_pretrained", classmethod(old_from_pretrained))
    return seen


def _as_old_transformers(monkeypatch):
    """transformers 4.4x–4.55: ``from_pretrained(..., dtype=...)`` raises a TypeError (the kwarg reaches __init__)."""
    import transformers
    from transformers import PreTrainedModel

    monkeypatch.setattr(transformers, "__version__", "4.50.3")
    original = PreTrainedModel.from_pretrained.__func__
    seen = []

    def old_from_pretrained(cls, *args, **kwargs):
        seen.append(sorted(k for k in kwargs if "dtype" in k))
        if "dtype" in kwargs:
            raise TypeError(f"{cls.__name__}.__init__() got an unexpected keyword argument 'dtype'")
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(old_from_pretrained))
    return seen


def test_older_diffusers_get_torch_dtype_and_load_in_bf16(sd3_dir, monkeypatch):
    assert _dtypes(_model(sd3_dir)) == EXPECTED                  # the installed versions
    seen = _as_old_diffusers(monkeypatch)
    assert _dtypes(_model(sd3_dir)) == EXPECTED                  # not fp32: the keyword it reads
    assert seen and all(s == ["torch_dtype"] for s in seen), seen


def test_older_transformers_get_torch_dtype(sd3_dir, monkeypatch):
    seen = _as_old_transformers(monkeypatch)
    assert _dtypes(_model(sd3_dir)) == EXPECTED
    assert len(seen) == 3 and all(s == ["torch_dtype"] for s in seen), seen


def test_a_library_error_is_not_reported_as_missing_weights(sd3_dir, monkeypatch):
    from transformers import CLIPTextModelWithProjection

    def broken(*args, **kwargs):
        raise TypeError("CLIPTextModelWithProjection.__init__() got an unexpected keyword argument 'dtype'")

    monkeypatch.setattr(CLIPTextModelWithProjection, "from_pretrained", broken)
    with pytest.raises(LibraryLoadError) as err:
        _model(sd3_dir)
    assert not isinstance(err.value, (WeightsError, FileNotFoundError))
    msg = str(err.value)
    assert "text encoder" in msg and "unexpected keyword argument 'dtype'" in msg
    assert "not for a missing" in msg and "transformers " in msg and "diffusers " in msg and "huggingface" not in msg

    # a corrupt weight file still is a weights error naming the component and how to get it
    bad = os.path.join(os.path.dirname(sd3_dir), "corrupt_sd3")
    if not os.path.isdir(bad):
        import shutil

        shutil.copytree(sd3_dir, bad)
        for f in os.listdir(os.path.join(bad, "transformer")):
            if f.endswith(".safetensors"):
                with open(os.path.join(bad, "transformer", f), "wb") as fh:
                    fh.write(b"not a safetensors file")
    monkeypatch.undo()
    with pytest.raises(WeightsError, match="could not load the transformer"):
        _model(bad)


def test_adapter_metadata_holds_only_what_loraconfig_needs_and_loads_exactly(sd3_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from safetensors import safe_open

    model = _model(sd3_dir, dtype="float32", t5=False, lora_alpha=16.0)       # α/r = 2 must travel
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    out = str(tmp_path / "lora")
    model.save_finetuned(out)
    with safe_open(os.path.join(out, LORA_WEIGHT_NAME), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert set(meta) == {"transformer.r", "transformer.lora_alpha", "transformer.target_modules"}, sorted(meta)
    cfg = {k.split(".", 1)[1]: v for k, v in meta.items()}
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16.0
    assert sorted(cfg["target_modules"]) == sorted(model.transformer.peft_config["default"].target_modules)
    LoraConfig(**cfg)                                                       # what diffusers does with it

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, text_encoder_3=None, tokenizer_3=None,
                                                    dtype=torch.float32)
    x = model.sample_noise(2, torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7, 0.3])
    cond = model.encode(["a photo of a cat", "a dog in the snow"])
    kw = dict(hidden_states=x, timestep=1000.0 * sigma, encoder_hidden_states=cond["encoder_hidden_states"],
              pooled_projections=cond["pooled_projections"], return_dict=False)
    with torch.no_grad():
        base = pipe.transformer(**kw)[0]
        pipe.load_lora_weights(out)
        loaded = pipe.transformer(**kw)[0]
        ours = model.transformer_u(x, sigma, cond)
    assert (loaded - ours).abs().max() <= 1e-5
    assert (ours - base).abs().max() > 1e-2


def test_tf32_on_cuda_only(sd3_dir, monkeypatch):
    import align.models.sd3 as sd3

    before = torch.get_float32_matmul_precision()
    calls = []
    real = sd3.enable_tf32
    monkeypatch.setattr(sd3, "enable_tf32", lambda: calls.append(1) or real())
    _model(sd3_dir, dtype="float32", t5=False)
    assert calls == [1]                                                     # the model's set-up asks for it
    if not torch.cuda.is_available():
        assert torch.get_float32_matmul_precision() == before              # a CPU run is untouched
    try:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert real() is True
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)


# ---- memory: the aesthetic reward and the metrics' CLIP features share one ViT-L/14 --------------------------------
def test_aesthetic_reward_and_clip_features_share_one_tower(sd3_dir, tmp_path):
    import shutil

    from rewards.aesthetic import AestheticReward
    from align.metrics.clip import ClipImageFeatures
    from helpers.tiny_clip import write_aesthetic_head, write_tiny_open_clip

    cfg, weights = write_tiny_open_clip(tmp_path, name="tiny-shared-l14", quick_gelu=True)
    head = write_aesthetic_head(tmp_path / "head.pth")
    model = _model(sd3_dir, dtype="float32", t5=False,
                   features={"kind": "clip", "model_name": cfg, "weights": weights, "quick_gelu": True})
    reward = AestheticReward(clip_model=cfg, clip_weights=weights, head_weights=head, quick_gelu=True)
    assert reward.clip is model.feature_net                        # one copy of the tower in memory
    shared = {id(p) for p in model.parameters()} & {id(p) for p in reward.parameters()}
    assert shared == {id(p) for p in reward.clip.parameters()} and shared

    # the scores and features are those of independent, unshared instances
    images = torch.rand(2, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0))
    alone = ClipImageFeatures(cfg, weights, quick_gelu=True)
    assert alone is not reward.clip
    with torch.no_grad():
        torch.testing.assert_close(model.feature_net(images), alone(images), rtol=0, atol=0)
        torch.testing.assert_close(reward(images), reward.head(alone(images)).squeeze(-1), rtol=0, atol=0)

    # another file, or another activation: another instance
    other = str(tmp_path / "copy.pt")
    shutil.copy(weights, other)
    assert AestheticReward(clip_model=cfg, clip_weights=other, head_weights=head).clip is not reward.clip
    assert AestheticReward(clip_model=cfg, clip_weights=weights, head_weights=head,
                           quick_gelu=False).clip is not reward.clip
