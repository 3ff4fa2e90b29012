"""``model=flux`` on tiny random FLUX.1 pipelines saved in the real diffusers layout (tests/helpers/tiny_flux.py), CPU.

Checked against diffusers itself: prompt embeddings = ``FluxPipeline.encode_prompt``; the flux grid = the
scheduler's sigmas with the pipeline's own μ (``calculate_shift``), at the tiny size and at 512² / 1024²; one Euler
step = ``FlowMatchEulerDiscreteScheduler.step``; a whole sampling run (packed latents and decoded images) = the
pipeline's ``__call__``, dev (guidance embedding) and schnell (none); bf16 timesteps as the pipeline feeds them; the
exported LoRA = ``FluxPipeline.load_lora_weights``; every algorithm trains two updates through the real trainer.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from align.models.flow_transformer import LORA_WEIGHT_NAME
from align.models.flux import FluxModel, pack_latents, unpack_latents
from align.prompt_sets import load_named_set
from align.core.weights import WeightsError
from samplers import dynamic_shift_mu, euler_integrate, flux_grid, one_step_prediction
from helpers.tiny_flux import (DEV_SCHEDULER, RESOLUTION, SCHNELL_SCHEDULER, build_tiny_flux, build_tiny_taef1,
                               load_flux, load_flux_pipe)
from helpers.tiny_sd3 import perturb_lora, tiny_reward_registered as _tiny_reward_registered

PROMPTS = ["a photo of a cat", "a dog in the snow"]
T5_LEN = 16


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> str:
    return build_tiny_flux(str(tmp_path_factory.mktemp("tiny_flux")))


@pytest.fixture(scope="module")
def schnell_dir(tmp_path_factory) -> str:
    return build_tiny_flux(str(tmp_path_factory.mktemp("tiny_schnell")), guidance=False, seed=7)


def _noise(model, n: int = 2, seed: int = 0) -> torch.Tensor:
    return model.sample_noise(n, torch.Generator().manual_seed(seed))


# ---- (1) loading, packing, prompt embeddings ---------------------------------------------------------------------
def test_loads_the_pipeline_directory_and_embeds_prompts_like_encode_prompt(flux_dir):
    model = load_flux(flux_dir, keep_text_encoders=False)
    assert model.data_shape == (16, RESOLUTION // 8, RESOLUTION // 8) and model.guidance_embeds
    model.prepare(load_named_set("animals"), "flux", 3.0)
    assert model._text is None and not any("text_encoder" in n for n, _ in model.named_modules())
    assert len(model._cache) == len(load_named_set("animals")) + 1
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.trainable_parameters())
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in model.transformer.named_parameters() if "lora_" in n}
    assert "single_transformer_blocks.0.attn.to_q" in adapted and "transformer_blocks.0.attn.to_out.0" in adapted
    with pytest.raises(KeyError, match="keep_text_encoders"):
        model.encode(["a prompt outside the set"])

    model = load_flux(flux_dir)
    ours = model.encode(PROMPTS)
    with torch.no_grad():      # (as we encode: SDPA may pick another kernel under grad)
        tokens, pooled, text_ids = load_flux_pipe(flux_dir).encode_prompt(PROMPTS, None, device="cpu",
                                                                          max_sequence_length=T5_LEN)
    assert ours["encoder_hidden_states"].shape == (2, T5_LEN, 32) and ours["pooled_projections"].shape == (2, 16)
    assert torch.equal(ours["encoder_hidden_states"], tokens) and torch.equal(ours["pooled_projections"], pooled)
    assert torch.equal(text_ids, torch.zeros(T5_LEN, 3))


def test_packing_and_position_ids_are_the_pipelines():
    from diffusers import FluxPipeline

    x = torch.randn(3, 16, 6, 4)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 3, 16, 6, 4))
    assert torch.equal(unpack_latents(packed, 6, 4), x)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 6 * 8, 4 * 8, 8), x)
    from align.models.flux import image_position_ids
    assert torch.equal(image_position_ids(6, 4), FluxPipeline._prepare_latent_image_ids(3, 3, 2, "cpu", torch.float32))


# ---- (2) the grid, one step, the whole pipeline -------------------------------------------------------------------
@pytest.mark.parametrize("config", ["dev", "schnell"])
@pytest.mark.parametrize("tokens", [4, 1024, 4096])              # the tiny size, 512², 1024²
@pytest.mark.parametrize("steps", [1, 6, 28])
def test_flux_grid_is_the_schedulers_with_the_pipelines_mu(config, tokens, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = DEV_SCHEDULER if config == "dev" else SCHNELL_SCHEDULER
    sched = FlowMatchEulerDiscreteScheduler(**cfg)
    mu = calculate_shift(tokens, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"],
                         cfg["max_shift"])
    assert dynamic_shift_mu(tokens) == pytest.approx(mu, abs=1e-12)
    sched.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    shift = float(np.exp(mu)) if cfg["use_dynamic_shifting"] else cfg["shift"]
    torch.testing.assert_close(flux_grid(steps, shift), 1.0 - sched.sigmas.double(), atol=1e-6, rtol=0)
    if config == "dev" and tokens == 4096:
        assert mu == pytest.approx(1.15)                       # FLUX.1-dev at 1024²: the max shift


def test_model_grid_shift_and_one_euler_step_match_the_scheduler(flux_dir, schnell_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    schnell = load_flux(schnell_dir)
    assert schnell.grid_shift == 1.0 and not schnell.guidance_embeds
    model = load_flux(flux_dir)
    assert model.image_seq_len == 4 and model.grid_mu == pytest.approx(calculate_shift(4))
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(flux_dir, subfolder="scheduler")
    sched.set_timesteps(8, sigmas=np.linspace(1.0, 1 / 8, 8), mu=model.grid_mu)
    ts = 1.0 - sched.sigmas.double()
    torch.testing.assert_close(flux_grid(8, model.grid_shift), ts, atol=1e-6, rtol=0)
    cond = model.encode(PROMPTS)
    for k in (0, 3, 7):
        x = _noise(model, seed=k)
        with torch.no_grad():
            u = model.guided_u(x, sched.sigmas[k].expand(2), cond)
        sched._step_index = None
        ref = unpack_latents(sched.step(pack_latents(u), sched.timesteps[k], pack_latents(x), return_dict=False)[0],
                             4, 4)
        ours = euler_integrate(lambda xx, t: -u, x, ts, start=k, end=k + 1, record=False)
        assert torch.equal(ours, ref), f"step {k}: max diff {(ours - ref).abs().max():.3g}"


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_sampling_and_decode_reproduce_the_flux_pipeline(flux_dir, schnell_dir, variant):
    path = flux_dir if variant == "dev" else schnell_dir
    model, pipe = load_flux(path, guidance_scale=3.5), load_flux_pipe(path)
    x0 = _noise(model)
    steps = 6
    kw = dict(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=3.5, height=RESOLUTION, width=RESOLUTION,
              latents=pack_latents(x0), max_sequence_length=T5_LEN)
    with torch.no_grad():
        ref_latents = pipe(output_type="latent", **kw).images
        ref_images = pipe(output_type="pt", **kw).images
        cond = model.encode(PROMPTS)
        x1 = euler_integrate(lambda x, t: model.velocity(x, t, cond), x0, flux_grid(steps, model.grid_shift),
                             record=False)
        images = model.decode(x1)
    err = (pack_latents(x1) - ref_latents).abs().max().item()
    assert err < 1e-5 * ref_latents.abs().max().item(), err
    assert (x1 - x0).abs().max() > 0.1
    torch.testing.assert_close(images, ref_images, atol=1e-5, rtol=0)


def test_guidance_embedding_changes_dev_and_not_schnell(flux_dir, schnell_dir):
    for path, changes in ((flux_dir, True), (schnell_dir, False)):
        model = load_flux(path)
        x, cond, t = _noise(model), model.encode(PROMPTS), torch.tensor([0.3, 0.7])
        with torch.no_grad():
            a, b = model.velocity(x, t, cond, guidance_scale=1.0), model.velocity(x, t, cond, guidance_scale=5.0)
        assert bool((a - b).abs().max() > 1e-4) == changes


def test_bf16_timesteps_as_the_pipeline_feeds_them_or_exact(flux_dir):
    """exact_timesteps=false feeds what FluxPipeline feeds in bf16 (bf16(1000σ) / 1000): bitwise its transformer
    call; true keeps σ and σ + 1e-4 apart, which bf16 rounding merges."""
    pipe = load_flux_pipe(flux_dir, dtype=torch.bfloat16)
    rounded = load_flux(flux_dir, dtype="bfloat16", exact_timesteps=False)
    exact = load_flux(flux_dir, dtype="bfloat16", exact_timesteps=True)
    x = _noise(rounded).bfloat16().float()
    cond = rounded.encode(PROMPTS)
    sigma = torch.tensor([0.6123, 0.6123])
    with torch.no_grad():
        ref = pipe.transformer(hidden_states=pack_latents(x).bfloat16(), timestep=(1000 * sigma).bfloat16() / 1000,
                               guidance=torch.full((2,), 3.5), pooled_projections=cond["pooled_projections"].bfloat16(),
                               encoder_hidden_states=cond["encoder_hidden_states"].bfloat16(),
                               txt_ids=torch.zeros(T5_LEN, 3, dtype=torch.bfloat16),
                               img_ids=pipe._prepare_latent_image_ids(2, 2, 2, "cpu", torch.bfloat16),
                               return_dict=False)[0]
        assert torch.equal(rounded.transformer_u(x, sigma, cond), unpack_latents(ref, 4, 4).float())
        near = sigma + 1e-4
        assert torch.equal(rounded.transformer_u(x, sigma, cond), rounded.transformer_u(x, near, cond))
        assert not torch.equal(exact.transformer_u(x, sigma, cond), exact.transformer_u(x, near, cond))


# ---- (3) LoRA export → diffusers --------------------------------------------------------------------------------
def test_saved_lora_loads_into_the_flux_pipeline_exactly(flux_dir, tmp_path):
    model = load_flux(flux_dir, lora_alpha=16.0)                 # α/r = 2: the scale must travel with the file
    perturb_lora(model)
    out_dir = str(tmp_path / "finetuned")
    model.save_finetuned(out_dir)
    assert os.path.isfile(os.path.join(out_dir, LORA_WEIGHT_NAME))
    pipe = load_flux_pipe(flux_dir)
    x, cond, sigma = _noise(model), model.encode(PROMPTS), torch.tensor([0.7, 0.3])
    kw = dict(hidden_states=pack_latents(x), timestep=sigma, guidance=torch.full((2,), 3.5),
              pooled_projections=cond["pooled_projections"], encoder_hidden_states=cond["encoder_hidden_states"],
              txt_ids=torch.zeros(T5_LEN, 3), img_ids=pipe._prepare_latent_image_ids(2, 2, 2, "cpu", torch.float32),
              return_dict=False)
    with torch.no_grad():
        base = unpack_latents(pipe.transformer(**kw)[0], 4, 4)
        pipe.load_lora_weights(out_dir)
        loaded = unpack_latents(pipe.transformer(**kw)[0], 4, 4)
        ours = model.transformer_u(x, sigma, cond)
        ours_base = model.base_velocity(x, 1 - sigma, cond)
    assert (loaded - ours).abs().max() <= 1e-5
    assert (ours - base).abs().max() > 1e-2                     # the adapter changes the output
    torch.testing.assert_close(-ours_base, base, atol=1e-5, rtol=0)
    fresh = load_flux(flux_dir, lora_alpha=16.0)
    fresh.load_finetuned(out_dir)
    with torch.no_grad():
        assert torch.equal(fresh.transformer_u(x, sigma, cond), ours)


# ---- (4) decode, gradients, checkpointing ---------------------------------------------------------------------------
def _tiny_reward(images: torch.Tensor) -> torch.Tensor:
    w = torch.linspace(-1.0, 1.0, 3 * 4 * 4, dtype=images.dtype)
    return (F.adaptive_avg_pool2d(images, 4).flatten(1) * w).sum(1)


@pytest.mark.parametrize("decoder", ["vae", "taef1"])
def test_decode_and_reward_gradients_reach_latents_and_lora(flux_dir, tmp_path, decoder):
    taef1 = build_tiny_taef1(str(tmp_path / "taef1"))
    model = load_flux(flux_dir, decoder=decoder, taef1_path=taef1)
    assert (model.scaling_factor, model.shift_factor) == ((0.3611, 0.1159) if decoder == "vae" else (1.0, 0.0))
    perturb_lora(model, scale=0.05)
    x = (_noise(model) * 3.0).requires_grad_(True)
    img = model.decode(x)
    assert img.shape == (2, 3, RESOLUTION, RESOLUTION) and 0 <= img.min() and img.max() <= 1 and img.std() > 0
    (gx,) = torch.autograd.grad(_tiny_reward(img).sum(), x)
    assert gx.abs().sum() > 0 and torch.isfinite(gx).all()
    cond, t, xt = model.encode(PROMPTS), torch.tensor([0.6, 0.6]), _noise(model, seed=3)
    r = _tiny_reward(model.decode(one_step_prediction(xt, t, model.velocity(xt, t, cond)))).sum()
    grads = torch.autograd.grad(r, model.trainable_parameters())
    assert sum(g.abs().sum() for g in grads) > 0


def test_gradient_checkpointing_gives_the_same_gradients(flux_dir):
    grads = []
    for gc in (False, True):
        model = load_flux(flux_dir, gradient_checkpointing=gc)
        assert model.transformer.gradient_checkpointing == gc      # on by default (FluxConfig), off when asked
        perturb_lora(model, scale=0.05)
        x, cond = _noise(model), model.encode(PROMPTS)
        loss = model.velocity(x, torch.tensor([0.4, 0.8]), cond).pow(2).sum()
        grads.append(torch.autograd.grad(loss, model.trainable_parameters()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_value_network_cross_attends_to_the_t5_tokens(flux_dir):
    model = load_flux(flux_dir, value_net={"block_out_channels": [8, 16], "attention_head_dim": 4})
    net = model.make_value_network()
    assert net.unet.config.in_channels == 16 and net.unet.config.cross_attention_dim == 32
    out = net(_noise(model), torch.tensor([0.2, 0.9]), model.encode(PROMPTS))
    assert out.shape == (2, 16, 4, 4) and 0 < out.abs().max() < 1e-2


# ---- (5) errors ------------------------------------------------------------------------------------------------------
def test_missing_or_wrong_checkpoint_gives_a_clear_error(flux_dir, tmp_path):
    missing = str(tmp_path / "no_such_dir")
    with pytest.raises(WeightsError) as err:
        load_flux(missing)
    msg = str(err.value)
    assert missing in msg and "model.pretrained" in msg and "huggingface-cli download" in msg and "FLUX.1" in msg
    no_weights = str(tmp_path / "no_weights")
    shutil.copytree(flux_dir, no_weights)
    for f in os.listdir(os.path.join(no_weights, "transformer")):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(no_weights, "transformer", f))
    with pytest.raises(WeightsError, match=r"transformer/\*\.safetensors or transformer/\*\.bin"):
        load_flux(no_weights)
    no_t5 = str(tmp_path / "no_t5")
    shutil.copytree(flux_dir, no_t5, ignore=shutil.ignore_patterns("text_encoder_2"))
    with pytest.raises(WeightsError, match="text_encoder_2"):
        load_flux(no_t5)
    with pytest.raises(WeightsError, match="model.pretrained=nobody-here/no-such-flux"):
        load_flux("nobody-here/no-such-flux")
    with pytest.raises(WeightsError, match="model.taef1_path"):
        load_flux(flux_dir, decoder="taef1", taef1_path=str(tmp_path / "no_taef1"))
    with pytest.raises(ValueError, match="model.resolution"):
        load_flux(flux_dir, resolution=40)
    with pytest.raises(ValueError, match="sampler.grid=flux"):
        load_flux(flux_dir).prepare(["a cat"], "sd3", 3.0)


def test_flux_grid_needs_a_flux_model():
    from omegaconf import OmegaConf

    from align.setup.build import build_grid

    cfg = OmegaConf.create({"sampler": {"grid": "flux", "steps": 4, "shift": 3.0, "mu": None}})
    with pytest.raises(ValueError, match="sampler.mu"):
        build_grid(cfg, model=None)
    cfg.sampler.mu = 1.15
    torch.testing.assert_close(build_grid(cfg), flux_grid(4, float(np.exp(1.15))))


# ---- (6) every algorithm through the real trainer -----------------------------------------------------------------
ALGOS = ["vggflow", "vggflow_pmp", "refl", "draft", "adjoint_matching", "flow_grpo", "diffusion_nft"]


@pytest.fixture
def tiny_reward_registered():
    with _tiny_reward_registered() as name:
        yield name


@pytest.mark.parametrize("algo", ALGOS)
def test_every_algorithm_trains_two_steps_on_tiny_flux(flux_dir, tmp_path, algo, tiny_reward_registered):
    from omegaconf import open_dict

    from align.setup.assemble import build_trainer
    from align.setup.compose import compose_config
    from align.core.run_dir import read_metrics

    run_dir = str(tmp_path / "run")
    overrides = [f"algo={algo}", "model=flux", "reward=aesthetic", f"model.pretrained={flux_dir}",
                 "model.dtype=float32", f"model.resolution={RESOLUTION}", f"model.max_sequence_length={T5_LEN}",
                 "model.decoder=vae", "model.features.kind=pixels", "model.value_net.block_out_channels=[8,16]",
                 "model.value_net.attention_head_dim=4", "prompts=hpdv2", "sampler.steps=4", "train.steps=2",
                 "train.batch_size=2", "train.progress=false", "eval.every=0", "eval.n_samples=4",
                 "eval.group_size=2", "eval.final_samples=2", "device=cpu"]
    if algo in ("vggflow", "vggflow_pmp"):
        overrides.append("algo.subsample_bins=2")
    if algo == "flow_grpo":                                  # FLUX's own grid for the training SDE, as flow_grpo's
        overrides += ["algo.group_size=2", "algo.train_grid=flux", "algo.train_steps=3"]
    if algo == "diffusion_nft":
        overrides.append("algo.group_size=2")
    cfg = compose_config(overrides, run_dir=run_dir)
    assert cfg.sampler.grid == "flux"
    if algo in ("vggflow", "adjoint_matching", "flow_grpo"):  # borrowed from SD3's aesthetic row; flow_grpo's FLUX β
        assert cfg.algo.beta == {"vggflow": 5e4, "adjoint_matching": 5e3, "flow_grpo": 0.0}[algo]
    with open_dict(cfg):
        cfg.reward = {"name": tiny_reward_registered}
    trainer = build_trainer(cfg, run_dir)
    assert isinstance(trainer.model, FluxModel) and trainer.model._text is None
    torch.testing.assert_close(trainer.ts, flux_grid(4, trainer.model.grid_shift))
    if algo == "flow_grpo":
        torch.testing.assert_close(trainer.algo.train_ts, flux_grid(3, trainer.model.grid_shift))
    before = [p.detach().clone() for p in trainer.model.trainable_parameters()]
    trainer.train()
    rows = read_metrics(run_dir)
    assert rows[-1]["step"] == 2 and "eval/reward" in rows[-1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows[1:])
    assert sum((p.detach() - b).abs().sum().item() for p, b in zip(trainer.model.trainable_parameters(), before)) > 0
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "step_0000002", "finetuned", LORA_WEIGHT_NAME))
