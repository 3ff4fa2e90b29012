"""``model=sd3`` on a tiny random SD3 pipeline saved in the real diffusers layout (tests/helpers/tiny_sd3.py), on CPU.

Checked against diffusers itself: prompt embeddings = ``StableDiffusion3Pipeline.encode_prompt``; one Euler
step = ``FlowMatchEulerDiscreteScheduler.step``; our grid = the scheduler's sigmas as t = 1 − σ; a whole
sampling run + decode = the pipeline's own ``__call__``; the exported LoRA = ``load_lora_weights``.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch.nn import functional as F

from align.models.flow_transformer import LORA_WEIGHT_NAME
from align.models.sd3 import SD3Model
from align.models.value_unet import ValueUNet
from align.prompt_sets import NAMED_SETS, load_named_set
from align.setup.prompts import load_prompts
from align.core.weights import WeightsError
from samplers import euler_integrate, one_step_prediction, sd3_grid
from helpers.tiny_sd3 import RESOLUTION, build_tiny_sd3, build_tiny_taesd3
from helpers.tiny_sd3 import fixed_noise as _noise
from helpers.tiny_sd3 import load_model as _model
from helpers.tiny_sd3 import load_pipe as _pipe
from helpers.tiny_sd3 import perturb_lora as _perturb_lora
from helpers.tiny_sd3 import tiny_reward_registered as _tiny_reward_registered

PROMPTS = ["a photo of a cat", "a dog in the snow"]      # outside the built-in sets: encoded in one batch


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> str:
    return build_tiny_sd3(str(tmp_path_factory.mktemp("tiny_sd3")), t5=True)


@pytest.fixture(scope="module")
def taesd_dir(tmp_path_factory) -> str:
    return build_tiny_taesd3(str(tmp_path_factory.mktemp("tiny_taesd3")))


# ---- (1) loading, prompt embeddings ---------------------------------------------------------------------------
@pytest.mark.parametrize("t5", [False, True])
def test_loads_the_pipeline_directory_and_embeds_prompts_like_diffusers(sd3_dir, t5):
    model = _model(sd3_dir, t5=t5, keep_text_encoders=False)
    assert model._text is not None and not model._cache           # nothing encoded before prepare
    model.prepare(load_named_set("animals"), "sd3", 3.0)
    assert model.data_shape == (16, RESOLUTION // 8, RESOLUTION // 8)
    assert model.scheduler_shift == 3.0 and model.guidance_scale == 5.0
    assert model._text is None                                    # text encoders freed after caching
    assert not any("text_encoder" in n for n, _ in model.named_modules())
    assert set(model.prompt_set) == set(load_named_set("animals")) and len(model._cache) == len(model.prompt_set) + 1
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for n, p in model.named_parameters()
                                                             if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())

    model.free_text_encoders()
    with pytest.raises(KeyError, match="keep_text_encoders"):
        model.encode(["a prompt outside the set"])
    model = _model(sd3_dir, t5=t5, keep_text_encoders=True)
    ours = model.encode(PROMPTS)
    neg = model.negative_cond(len(PROMPTS))
    with torch.no_grad():                       # (as we encode; SDPA may pick another kernel under grad)
        pe, npe, ppe, nppe = _pipe(sd3_dir, t5=t5).encode_prompt(PROMPTS, None, None, device="cpu",
                                                                  do_classifier_free_guidance=True)
    assert ours["encoder_hidden_states"].shape == (2, 77 + 256, 32)
    assert torch.equal(ours["encoder_hidden_states"], pe) and torch.equal(ours["pooled_projections"], ppe)
    # "" was cached at start in a batch with the prompt set, the pipeline encodes ["", ""]: batch-size rounding
    torch.testing.assert_close(neg["encoder_hidden_states"], npe, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(neg["pooled_projections"], nppe, atol=2e-5, rtol=1e-4)
    t5_part = ours["encoder_hidden_states"][:, 77:]
    assert (t5_part.abs().max() > 0) == t5                         # zeros exactly when T5 is off


def test_hub_id_resolves_through_the_hf_cache_offline(sd3_dir, tmp_path, monkeypatch):
    """model.pretrained=<owner/name> takes the same loading path via the HF cache (HF_HUB_OFFLINE=1 here)."""
    import huggingface_hub.constants as hf_constants

    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-sd3" / "snapshots" / "0123abc"
    shutil.copytree(sd3_dir, snapshot)
    (tmp_path / "hub" / "models--tiny-org--tiny-sd3" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny-org--tiny-sd3" / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = _model("tiny-org/tiny-sd3")
    assert os.path.samefile(model.pretrained_dir, snapshot)
    reference = _model(sd3_dir)
    x, cond = _noise(model), model.encode(PROMPTS)
    with torch.no_grad():
        assert torch.equal(model.velocity(x, torch.tensor([0.5, 0.5]), cond),
                           reference.velocity(x, torch.tensor([0.5, 0.5]), cond))


# ---- (2) the convention against the real scheduler and pipeline ---------------------------------------------
def test_grid_and_one_euler_step_match_the_scheduler(sd3_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = _model(sd3_dir)
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(sd3_dir, subfolder="scheduler")
    sched.set_timesteps(20)
    ts_sched = 1.0 - sched.sigmas.double()
    torch.testing.assert_close(sd3_grid(20, model.scheduler_shift), ts_sched, atol=1e-6, rtol=0)
    assert torch.equal(sched.timesteps, 1000.0 * sched.sigmas[:-1])          # τ = 1000σ
    cond = model.encode(PROMPTS)
    for k in (0, 7, 19):
        x = _noise(model, seed=k)
        with torch.no_grad():
            u = model.guided_u(x, sched.sigmas[k].expand(2), cond)
        sched._step_index = None
        ref = sched.step(u, sched.timesteps[k], x, return_dict=False)[0]
        ours = euler_integrate(lambda xx, t: -u, x, ts_sched, start=k, end=k + 1, record=False)   # v = −u
        assert torch.equal(ours, ref), f"step {k}: max diff {(ours - ref).abs().max():.3g}"


def test_sampling_and_decode_reproduce_the_diffusers_pipeline(sd3_dir):
    model = _model(sd3_dir, t5=True)
    pipe = _pipe(sd3_dir, t5=True)
    x0 = _noise(model)
    steps = 6
    kw = dict(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=5.0, height=RESOLUTION, width=RESOLUTION,
              latents=x0.clone())
    with torch.no_grad():
        ref_latents = pipe(output_type="latent", **kw).images
        ref_images = pipe(output_type="pt", **kw).images
        cond = model.encode(PROMPTS)
        x1 = euler_integrate(lambda x, t: model.velocity(x, t, cond), x0, sd3_grid(steps, model.scheduler_shift),
                             record=False)
        images = model.decode(x1)
    err = (x1 - ref_latents).abs().max().item()
    assert err < 1e-4 * ref_latents.abs().max().item(), err
    assert (x1 - x0).abs().max() > 0.1                                  # the check is not vacuous
    torch.testing.assert_close(images, ref_images, atol=1e-4, rtol=0)


# ---- (4) LoRA export → diffusers ----------------------------------------------------------------------------------
def test_saved_lora_loads_into_the_diffusers_pipeline_exactly(sd3_dir, tmp_path):
    model = _model(sd3_dir, lora_alpha=16.0)                # α/r = 2: the scale must travel with the file
    _perturb_lora(model)
    out_dir = str(tmp_path / "finetuned")
    model.save_finetuned(out_dir)
    assert os.path.isfile(os.path.join(out_dir, LORA_WEIGHT_NAME))
    pipe = _pipe(sd3_dir, t5=False)
    x = _noise(model)
    sigma = torch.tensor([0.7, 0.3])
    cond = model.encode(PROMPTS)
    kw = dict(hidden_states=x, timestep=1000.0 * sigma, encoder_hidden_states=cond["encoder_hidden_states"],
              pooled_projections=cond["pooled_projections"], return_dict=False)
    with torch.no_grad():
        base = pipe.transformer(**kw)[0]
        pipe.load_lora_weights(out_dir)
        loaded = pipe.transformer(**kw)[0]
        ours = model.transformer_u(x, sigma, cond)
        ours_base = model.base_velocity(x, 1 - sigma, cond, guidance_scale=1.0)
    diff = (loaded - ours).abs().max().item()
    print(f"LoRA round trip: max |u_pipeline+LoRA − u_ours| = {diff:.3g}; LoRA effect {(ours - base).abs().max():.3g}")
    assert diff <= 1e-5
    assert (ours - base).abs().max() > 1e-2                     # the adapter changes the output
    torch.testing.assert_close(-ours_base, base, atol=1e-5, rtol=0)

    fresh = _model(sd3_dir, lora_alpha=16.0)
    fresh.load_finetuned(out_dir)
    with torch.no_grad():
        assert torch.equal(fresh.transformer_u(x, sigma, cond), ours)


# ---- (5) decode and gradients ------------------------------------------------------------------------------------
def _tiny_reward(images: torch.Tensor) -> torch.Tensor:
    w = torch.linspace(-1.0, 1.0, 3 * 4 * 4, dtype=images.dtype)
    return (F.adaptive_avg_pool2d(images, 4).flatten(1) * w).sum(1)


@pytest.mark.parametrize("decoder", ["vae", "taesd3"])
def test_decode_is_an_image_in_unit_range_and_reward_gradients_reach_latents_and_lora(sd3_dir, taesd_dir,
                                                                                        decoder):
    model = _model(sd3_dir, decoder=decoder, taesd3_path=taesd_dir)
    _perturb_lora(model, scale=0.05)
    x = (_noise(model) * 3.0).requires_grad_(True)
    img = model.decode(x)
    assert img.shape == (2, 3, RESOLUTION, RESOLUTION) and img.dtype == torch.float32
    assert img.min() >= 0 and img.max() <= 1 and img.std() > 0
    with torch.no_grad():                               # the decoder's own decode and latent factors
        raw = model.decoder.decode(x / model.scaling_factor + model.shift_factor).sample
    torch.testing.assert_close(img, (raw / 2 + 0.5).clamp(0, 1))
    (gx,) = torch.autograd.grad(_tiny_reward(img).sum(), x)
    assert gx.abs().sum() > 0 and torch.isfinite(gx).all()
    # through the model: r(decode(x̂_1)) with x̂_1 = x_t + (1 − t) v_θ(x_t, t) → LoRA weights
    cond = model.encode(PROMPTS)
    t = torch.tensor([0.6, 0.6])
    xt = _noise(model, seed=3)
    r = _tiny_reward(model.decode(one_step_prediction(xt, t, model.velocity(xt, t, cond)))).sum()
    grads = torch.autograd.grad(r, model.trainable_parameters())
    assert sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in model.decoder.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(sd3_dir):
    grads = []
    for gc in (False, True):
        model = _model(sd3_dir, gradient_checkpointing=gc)
        _perturb_lora(model, scale=0.05)
        x, cond = _noise(model), model.encode(PROMPTS)
        loss = model.velocity(x, torch.tensor([0.4, 0.8]), cond).pow(2).sum()
        grads.append(torch.autograd.grad(loss, model.trainable_parameters()))
    assert model.transformer.gradient_checkpointing
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_value_network_is_the_scaled_down_unet(sd3_dir):
    model = _model(sd3_dir, value_net={"block_out_channels": [8, 16], "attention_head_dim": 4})
    net = model.make_value_network()
    assert isinstance(net, ValueUNet)
    assert net.unet.config.in_channels == 16 and net.unet.config.cross_attention_dim == 32
    assert net.unet.config.block_out_channels == (8, 16)
    x, cond = _noise(model), model.encode(PROMPTS)
    out = net(x, torch.tensor([0.2, 0.9]), cond)
    assert out.shape == x.shape and 0 < out.abs().max() < 1e-2          # conv_out ×1e−3: ν ≈ 0 at the start
    assert out.requires_grad
    paper = ValueUNet(sample_size=128, cross_attention_dim=4096)
    assert paper.unet.config.block_out_channels == (64, 128, 256, 256) and paper.unet.config.layers_per_block == 1


def test_clip_features_when_available(sd3_dir, tmp_path):
    from helpers.tiny_clip import write_tiny_open_clip

    cfg, weights = write_tiny_open_clip(tmp_path, name="tiny-sd3-features")
    model = _model(sd3_dir, features={"kind": "clip", "model_name": cfg, "weights": weights, "quick_gelu": False})
    feats = model.features(_noise(model, n=3))
    assert feats.shape == (3, 16) and torch.allclose(feats.norm(dim=1), torch.ones(3), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="model.features.weights"):
        _model(sd3_dir, features={"kind": "clip", "model_name": cfg, "weights": str(tmp_path / "nope.pt")})


# ---- (6) errors --------------------------------------------------------------------------------------------------
def test_missing_or_wrong_checkpoint_gives_a_clear_error(sd3_dir, tmp_path):
    missing = str(tmp_path / "no_such_dir")
    with pytest.raises(WeightsError) as err:
        _model(missing)
    msg = str(err.value)
    assert missing in msg and "model.pretrained" in msg and "huggingface-cli download" in msg

    no_t5 = str(tmp_path / "no_t5")                       # a copy without the T5 encoder
    shutil.copytree(sd3_dir, no_t5, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    with pytest.raises(WeightsError) as err:
        _model(no_t5, t5=True)
    assert "text_encoder_3" in str(err.value) and "model.t5=false" in str(err.value)
    assert _model(no_t5, t5=False).data_shape == (16, 4, 4)

    no_weights = str(tmp_path / "no_weights")             # transformer folder without its weight file
    shutil.copytree(sd3_dir, no_weights)
    for f in os.listdir(os.path.join(no_weights, "transformer")):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(no_weights, "transformer", f))
    with pytest.raises(WeightsError, match=r"transformer/\*\.safetensors or transformer/\*\.bin"):
        _model(no_weights)

    with pytest.raises(WeightsError, match="model.pretrained=nobody-here/no-such-sd3"):
        _model("nobody-here/no-such-sd3")                   # hub id, offline: no network, no cache
    with pytest.raises(WeightsError, match="model.taesd3_path"):
        _model(sd3_dir, decoder="taesd3", taesd3_path=str(tmp_path / "no_taesd3"))
    with pytest.raises(ValueError, match="model.resolution"):
        _model(sd3_dir, resolution=36)
    with pytest.raises(ValueError, match=r"sampler.shift=1.0"):      # the grid must be the scheduler's
        _model(sd3_dir).prepare(["a cat"], "sd3", 1.0)


def test_prompt_sets_and_empty_prompt_file(sd3_dir, tmp_path, monkeypatch):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(f"file:{empty}", None)
    for name in NAMED_SETS:
        prompts = load_named_set(name)
        assert len(prompts) >= 20 and len(set(prompts)) == len(prompts) and all(p.strip() == p for p in prompts)
    assert len(load_named_set("animals")) >= 40
    model = _model(sd3_dir)
    assert load_prompts(None, model) == load_named_set("animals")            # the domain's default set
    model.prepare(load_prompts("pickapic", model), "sd3", 3.0)
    assert model.prompt_set == load_named_set("pickapic") and set(model._cache) == {"", *model.prompt_set}
    real = tmp_path / "photo.json"
    real.write_text('[{"prompt": "a real hpd prompt"}, "another one"]', encoding="utf-8")
    monkeypatch.setenv("ALIGN_HPDV2_PROMPTS", str(real))
    assert load_named_set("hpdv2") == ["a real hpd prompt", "another one"]
    monkeypatch.setenv("ALIGN_HPDV2_PROMPTS", str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="ALIGN_HPDV2_PROMPTS"):
        load_named_set("hpdv2")


# ---- (3) every algorithm through the real trainer -------------------------------------------------------------
ALGOS = ["vggflow", "vggflow_pmp", "refl", "draft", "adjoint_matching", "flow_grpo", "diffusion_nft"]


@pytest.fixture
def tiny_reward_registered():
    """Register the test reward for one test only (the registry stays clean for other test modules)."""
    with _tiny_reward_registered() as name:
        yield name


@pytest.mark.parametrize("algo", ALGOS)
def test_every_algorithm_trains_two_steps_on_tiny_sd3(sd3_dir, tmp_path, algo, tiny_reward_registered):
    from omegaconf import open_dict

    from align.setup.assemble import build_trainer
    from align.setup.compose import compose_config
    from align.core.run_dir import read_metrics

    run_dir = str(tmp_path / "run")
    overrides = [f"algo={algo}", "model=sd3", "reward=aesthetic", f"model.pretrained={sd3_dir}", "model.dtype=float32",
                 f"model.resolution={RESOLUTION}", "model.decoder=vae", "model.t5=false", "model.features.kind=pixels",
                 "model.value_net.block_out_channels=[8,16]", "model.value_net.attention_head_dim=4",
                 "prompts=hpdv2", "sampler.steps=4", "train.steps=2", "train.batch_size=2", "train.progress=false",
                 "eval.every=0", "eval.n_samples=4", "eval.group_size=2", "eval.final_samples=2", "device=cpu"]
    if algo in ("vggflow", "vggflow_pmp"):
        overrides.append("algo.subsample_bins=2")
    if algo in ("flow_grpo", "diffusion_nft"):            # groups of G samples per prompt in a batch of 2
        overrides += ["algo.group_size=2", "algo.train_steps=4"] if algo == "flow_grpo" else ["algo.group_size=2"]
    cfg = compose_config(overrides, run_dir=run_dir)
    assert "prompts" not in cfg.model and "sampler_shift" not in cfg.model       # read once, from the root
    if algo in ("vggflow", "adjoint_matching"):           # the sd3 domain row of paper_settings reaches the algorithm
        assert cfg.algo.beta == {"vggflow": 5e4, "adjoint_matching": 5e3}[algo]
    with open_dict(cfg):
        cfg.reward = {"name": tiny_reward_registered}
    trainer = build_trainer(cfg, run_dir)
    assert isinstance(trainer.model, SD3Model)
    assert trainer.model.prompt_set == trainer.prompt_set == load_named_set("hpdv2")   # resolved once, encoded once
    assert trainer.model._text is None                                                # then the encoders went
    before = [p.detach().clone() for p in trainer.model.trainable_parameters()]
    trainer.train()
    rows = read_metrics(run_dir)
    assert rows[-1]["step"] == 2 and "eval/reward" in rows[-1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows[1:])
    moved = sum((p.detach() - b).abs().sum().item() for p, b in zip(trainer.model.trainable_parameters(), before))
    assert moved > 0                                            # LoRA updated by the shared optimizer
    final = os.path.join(run_dir, "checkpoints", "step_0000002", "finetuned", LORA_WEIGHT_NAME)
    assert os.path.isfile(final)


def test_inception_features_need_their_weights_file(tmp_path, monkeypatch):
    from align.metrics.features import INCEPTION_WEIGHTS, build_features

    monkeypatch.delenv("ALIGN_INCEPTION_WEIGHTS", raising=False)
    for weights in (None, str(tmp_path / "nope.pth")):
        with pytest.raises(FileNotFoundError) as err:
            build_features({"kind": "inception", "weights": weights})
        msg = str(err.value)
        assert INCEPTION_WEIGHTS in msg and "model.features.weights" in msg and "ALIGN_INCEPTION_WEIGHTS" in msg
    with pytest.raises(ValueError, match="clip, dreamsim, inception, pixels"):
        build_features({"kind": "lpips"})
