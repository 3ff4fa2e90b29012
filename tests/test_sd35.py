"""``model=sd3`` with Stable Diffusion 3.5 checkpoints (``model.pretrained=stabilityai/stable-diffusion-3.5-medium``
or ``-large``), on tiny random SD3.5 pipelines saved in the real layout (tests/helpers/tiny_sd35.py: the published
transformer configs shrunk, dual attention layers and QK RMS-norm kept).

The same checks as tests/test_sd3.py, against diffusers itself: prompt embeddings = ``encode_prompt``; one Euler
step = ``FlowMatchEulerDiscreteScheduler.step``; a CFG sampling run = ``StableDiffusion3Pipeline.__call__``
(``output_type="latent"``); the exported LoRA, including the dual-attention ``attn2`` projections, loads through
``load_lora_weights`` and reproduces the finetuned transformer exactly; every algorithm trains two steps.
"""
from __future__ import annotations

import fnmatch
import json
import os

import pytest
import torch
from torch import nn

from align.models.flow_transformer import LORA_WEIGHT_NAME
from align.models.sd3 import SD3Model
from align.core.weights import WeightsError
from samplers import euler_integrate, sd3_grid
from helpers.tiny_sd3 import RESOLUTION
from helpers.tiny_sd3 import fixed_noise as _noise
from helpers.tiny_sd3 import load_model as _model
from helpers.tiny_sd3 import load_pipe as _pipe
from helpers.tiny_sd3 import perturb_lora as _perturb_lora
from helpers.tiny_sd3 import tiny_reward_registered as _tiny_reward_registered
from helpers.tiny_sd35 import SD35_PUBLISHED, SD35_SCHEDULER, TINY, build_tiny_sd35

PROMPTS = ["a photo of a cat", "a dog in the snow"]
VARIANTS = ["medium", "large"]


@pytest.fixture(scope="module")
def sd35_dirs(tmp_path_factory) -> dict[str, str]:
    return {v: build_tiny_sd35(str(tmp_path_factory.mktemp(f"tiny_sd35_{v}")), variant=v, t5=True)
            for v in VARIANTS}


def _adapted(module: nn.Module) -> set[str]:
    """The names of the peft LoRA layers in ``module``."""
    from peft.tuners.lora import LoraLayer

    return {n for n, m in module.named_modules() if isinstance(m, LoraLayer)}


# ---- the checkpoint is SD3.5's and loads with its options ------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_loads_the_sd35_layout_with_dual_attention_and_qk_norm(sd35_dirs, variant):
    with open(os.path.join(sd35_dirs[variant], "transformer", "config.json")) as f:
        saved = json.load(f)
    published = SD35_PUBLISHED[variant]
    for key in ("qk_norm", "pos_embed_max_size", "sample_size", "patch_size", "in_channels", "out_channels"):
        assert saved[key] == published[key], key
    assert tuple(saved["dual_attention_layers"]) == TINY[variant]["dual_attention_layers"]
    with open(os.path.join(sd35_dirs[variant], "scheduler", "scheduler_config.json")) as f:
        sched = json.load(f)
    assert {k: sched[k] for k in SD35_SCHEDULER} == SD35_SCHEDULER

    model = _model(sd35_dirs[variant])
    tr = model.transformer
    assert tuple(tr.config.dual_attention_layers) == TINY[variant]["dual_attention_layers"]
    assert tr.config.qk_norm == "rms_norm" and model.scheduler_shift == 3.0
    assert model.data_shape == (16, RESOLUTION // 8, RESOLUTION // 8)
    dual = [i for i, b in enumerate(tr.transformer_blocks) if b.attn2 is not None]
    assert dual == list(TINY[variant]["dual_attention_layers"])
    assert all(type(b.attn.norm_q).__name__ == "RMSNorm" for b in tr.transformer_blocks)
    # the paper's LoRA targets (to_q, to_k, to_v, to_out.0) reach the dual-attention projections too
    adapted = _adapted(tr)
    for i in range(len(tr.transformer_blocks)):
        attns = ["attn", "attn2"] if i in dual else ["attn"]
        expected = {f"transformer_blocks.{i}.{a}.{m}" for a in attns for m in ("to_q", "to_k", "to_v", "to_out.0")}
        got = {n for n in adapted if n.startswith(f"transformer_blocks.{i}.")}
        assert got == expected, (i, sorted(got ^ expected))
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.trainable_parameters())


# ---- against diffusers: prompt embeddings, one scheduler step, a CFG sample --------------------------------------
@pytest.mark.parametrize("t5", [False, True])
def test_prompt_embeddings_equal_encode_prompt(sd35_dirs, t5):
    model = _model(sd35_dirs["medium"], t5=t5)
    ours = model.encode(PROMPTS)
    with torch.no_grad():
        pe, npe, ppe, nppe = _pipe(sd35_dirs["medium"], t5=t5).encode_prompt(
            PROMPTS, None, None, device="cpu", do_classifier_free_guidance=True)
    assert ours["encoder_hidden_states"].shape == (2, 77 + 256, 32)
    assert torch.equal(ours["encoder_hidden_states"], pe) and torch.equal(ours["pooled_projections"], ppe)
    neg = model.negative_cond(len(PROMPTS))      # "" cached in a batch with the prompt set: batch rounding only
    torch.testing.assert_close(neg["encoder_hidden_states"], npe, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(neg["pooled_projections"], nppe, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_euler_step_equals_the_scheduler_step(sd35_dirs, variant):
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = _model(sd35_dirs[variant])
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(sd35_dirs[variant], subfolder="scheduler")
    sched.set_timesteps(20)
    ts_sched = 1.0 - sched.sigmas.double()
    torch.testing.assert_close(sd3_grid(20, model.scheduler_shift), ts_sched, atol=1e-6, rtol=0)
    cond = model.encode(PROMPTS)
    for k in (0, 11, 19):
        x = _noise(model, seed=k)
        with torch.no_grad():
            u = model.guided_u(x, sched.sigmas[k].expand(2), cond)
        sched._step_index = None
        ref = sched.step(u, sched.timesteps[k], x, return_dict=False)[0]
        ours = euler_integrate(lambda xx, t: -u, x, ts_sched, start=k, end=k + 1, record=False)   # v = −u
        assert torch.equal(ours, ref), f"step {k}: max diff {(ours - ref).abs().max():.3g}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_cfg_sample_equals_the_diffusers_pipeline(sd35_dirs, variant):
    model = _model(sd35_dirs[variant], t5=True)
    pipe = _pipe(sd35_dirs[variant], t5=True)
    x0 = _noise(model)
    steps = 5
    with torch.no_grad():
        ref = pipe(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=5.0, height=RESOLUTION,
                   width=RESOLUTION, latents=x0.clone(), output_type="latent").images
        cond = model.encode(PROMPTS)
        x1 = euler_integrate(lambda x, t: model.velocity(x, t, cond), x0, sd3_grid(steps, model.scheduler_shift),
                             record=False)
    err = (x1 - ref).abs().max().item()
    assert err < 1e-4 * ref.abs().max().item(), err
    assert (x1 - x0).abs().max() > 0.1                                  # the check is not vacuous


# ---- LoRA export → diffusers, attn2 included ---------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_lora_round_trip_through_load_lora_weights_is_exact(sd35_dirs, variant, tmp_path):
    from safetensors.torch import load_file

    model = _model(sd35_dirs[variant], lora_alpha=16.0)              # α/r = 2: the scale travels with the file
    _perturb_lora(model)
    out_dir = str(tmp_path / "finetuned")
    model.save_finetuned(out_dir)
    keys = set(load_file(os.path.join(out_dir, LORA_WEIGHT_NAME)))
    dual = TINY[variant]["dual_attention_layers"]
    for i in dual:
        for m in ("to_q", "to_k", "to_v", "to_out.0"):
            assert f"transformer.transformer_blocks.{i}.attn2.{m}.lora_A.weight" in keys
            assert f"transformer.transformer_blocks.{i}.attn2.{m}.lora_B.weight" in keys
    pipe = _pipe(sd35_dirs[variant], t5=False)
    x, sigma, cond = _noise(model), torch.tensor([0.7, 0.3]), model.encode(PROMPTS)
    kw = dict(hidden_states=x, timestep=1000.0 * sigma, encoder_hidden_states=cond["encoder_hidden_states"],
              pooled_projections=cond["pooled_projections"], return_dict=False)
    with torch.no_grad():
        base = pipe.transformer(**kw)[0]
        pipe.load_lora_weights(out_dir)
        loaded = pipe.transformer(**kw)[0]
        ours = model.transformer_u(x, sigma, cond)
    assert _adapted(pipe.transformer) == _adapted(model.transformer)   # every adapted layer, attn2 too, came back
    diff = (loaded - ours).abs().max().item()
    assert diff <= 1e-5, diff
    assert (ours - base).abs().max() > 1e-2                            # the adapter changes the output
    if dual:                                                           # and its attn2 part matters
        with torch.no_grad():
            for n, p in model.transformer.named_parameters():
                if ".attn2." in n and "lora_B" in n:
                    p.zero_()
            assert (model.transformer_u(x, sigma, cond) - loaded).abs().max() > 1e-3

    fresh = _model(sd35_dirs[variant], lora_alpha=16.0)
    fresh.load_finetuned(out_dir)
    with torch.no_grad():
        assert torch.equal(fresh.transformer_u(x, sigma, cond), loaded)


# ---- bf16 + gradient checkpointing through the dual-attention blocks ---------------------------------------------
def test_bf16_gradient_checkpointing_gives_the_same_gradients(sd35_dirs):
    """θ-gradients of v_θ and the x-VJP of v_base (LoRA off: what VGG-Flow-PMP / Adjoint Matching differentiate)
    with checkpointing on equal those of the plain autograd graph, in bf16, on the SD3.5-medium blocks."""
    results = []
    for checkpointing in (False, True):
        model = _model(sd35_dirs["medium"], dtype="bfloat16", gradient_checkpointing=checkpointing)
        _perturb_lora(model, scale=0.05)
        x, cond, t = _noise(model).requires_grad_(True), model.encode(PROMPTS), torch.tensor([0.4, 0.8])
        v = model.velocity(x, t, cond)
        v_base = model.base_velocity(x, t, cond)
        loss = v.float().pow(2).sum() + (v_base.float() * torch.linspace(-1, 1, v_base.numel()).view_as(v_base)).sum()
        results.append(torch.autograd.grad(loss, [x, *model.trainable_parameters()]))
    assert model.transformer.gradient_checkpointing and model.transformer.dtype == torch.bfloat16
    assert results[0][0].abs().max() > 0 and all(torch.isfinite(g).all() for g in results[1])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ---- the hub ids -------------------------------------------------------------------------------------------------
# Files of the SD3.5 hub repositories: the diffusers folders beside single-file checkpoints (sd3.5_medium.safetensors,
# sd3.5_large.safetensors), ComfyUI workflows, and in -large a text_encoders/ folder of single-file encoders
SD35_HUB_FILES = [
    "model_index.json", "sd3.5_medium.safetensors", "sd3.5_large.safetensors", "SD3.5M_example_workflow.json",
    "mmdit-x.png", "LICENSE.md", "README.md",
    "scheduler/scheduler_config.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
    "text_encoder/model.safetensors", "text_encoder_2/config.json", "text_encoder_2/model.safetensors",
    "text_encoder_3/config.json", "text_encoder_3/model-00001-of-00002.safetensors",
    "text_encoder_3/model-00002-of-00002.safetensors", "text_encoder_3/model.safetensors.index.json",
    "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer_2/vocab.json", "tokenizer_3/spiece.model",
    "text_encoders/clip_g.safetensors", "text_encoders/clip_l.safetensors", "text_encoders/t5xxl_fp16.safetensors",
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_sd35_hub_id_downloads_only_the_diffusers_folders_and_names_itself(sd35_dirs, variant, monkeypatch,
                                                                          tmp_path):
    import huggingface_hub

    repo = f"stabilityai/stable-diffusion-3.5-{variant}"
    seen = {}

    def fake_snapshot_download(repo_id, allow_patterns=None, **_):
        seen["repo"], seen["patterns"] = repo_id, list(allow_patterns)
        return sd35_dirs[variant]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = _model(repo, t5=True)
    assert seen["repo"] == repo and model.pretrained_dir == sd35_dirs[variant]
    picked = [f for f in SD35_HUB_FILES if any(fnmatch.fnmatch(f, p) for p in seen["patterns"])]
    assert "transformer/diffusion_pytorch_model.safetensors" in picked and "tokenizer_3/spiece.model" in picked
    assert not any(f.endswith(".safetensors") and "/" not in f for f in picked)        # no 5 GB single file
    assert not any(f.startswith("text_encoders/") and f.endswith(".safetensors") for f in picked)

    monkeypatch.undo()                    # offline, an empty cache: the error names the requested repository
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))
    with pytest.raises(WeightsError) as err:
        _model(repo)
    msg = str(err.value)
    assert f"model.pretrained={repo}" in msg and f"huggingface-cli download {repo}" in msg
    assert "stable-diffusion-3-medium-diffusers" not in msg


# ---- every algorithm through the real trainer ----------------------------------------------------------------
@pytest.fixture
def tiny_reward_registered():
    with _tiny_reward_registered() as name:
        yield name


@pytest.mark.parametrize("algo", ["vggflow", "vggflow_pmp", "refl", "draft", "adjoint_matching"])
def test_every_algorithm_trains_two_steps_on_tiny_sd35(sd35_dirs, tmp_path, algo, tiny_reward_registered):
    from omegaconf import open_dict

    from align.setup.assemble import build_trainer
    from align.setup.compose import compose_config
    from align.core.run_dir import read_metrics

    run_dir = str(tmp_path / "run")
    overrides = [f"algo={algo}", "model=sd3", "reward=aesthetic", f"model.pretrained={sd35_dirs['medium']}",
                 "model.dtype=float32", f"model.resolution={RESOLUTION}", "model.decoder=vae", "model.t5=false",
                 "model.features.kind=pixels", "model.value_net.block_out_channels=[8,16]",
                 "model.value_net.attention_head_dim=4", "prompts=hpdv2", "sampler.steps=4", "train.steps=2",
                 "train.batch_size=2", "train.progress=false", "eval.every=0", "eval.n_samples=2",
                 "eval.group_size=2", "eval.final_samples=2", "device=cpu"]
    if algo in ("vggflow", "vggflow_pmp"):
        overrides.append("algo.subsample_bins=2")
    cfg = compose_config(overrides, run_dir=run_dir)
    with open_dict(cfg):
        cfg.reward = {"name": tiny_reward_registered}
    trainer = build_trainer(cfg, run_dir)
    assert isinstance(trainer.model, SD3Model) and trainer.model.transformer.config.qk_norm == "rms_norm"
    lora = dict(trainer.model.transformer.named_parameters())
    attn2 = {n: p.detach().clone() for n, p in lora.items() if ".attn2." in n and "lora_" in n}
    assert attn2
    before = [p.detach().clone() for p in trainer.model.trainable_parameters()]
    trainer.train()
    rows = read_metrics(run_dir)
    assert rows[-1]["step"] == 2 and "eval/reward" in rows[-1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows[1:])
    moved = sum((p.detach() - b).abs().sum().item() for p, b in zip(trainer.model.trainable_parameters(), before))
    assert moved > 0
    assert sum((lora[n].detach() - b).abs().sum().item() for n, b in attn2.items()) > 0    # attn2's LoRA trains
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "step_0000002", "finetuned", LORA_WEIGHT_NAME))
