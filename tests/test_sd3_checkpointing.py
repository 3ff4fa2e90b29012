"""``model.gradient_checkpointing=true`` on the tiny SD3 (tests/helpers/tiny_sd3.py) in bf16, for every algorithm.

diffusers' checkpointing recomputes each transformer block in backward; the base velocity runs the same
transformer with the LoRA adapter disabled, so the recomputation must see the adapter state of the forward
(VGG-Flow-PMP's and Adjoint Matching's costate sweeps differentiate v_base in x after ``base_velocity`` has
returned). Checked here: every algorithm runs two updates with checkpointing on, and the first update's
gradients (same seed, same inputs) are those of the run without checkpointing. The reference is the plain
autograd graph (checkpointing off), i.e. torch's own backward, not a formula of ours.
"""
from __future__ import annotations

import math

import pytest
import torch

from helpers.tiny_sd3 import RESOLUTION, build_tiny_sd3, tiny_reward_registered


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> str:
    return build_tiny_sd3(str(tmp_path_factory.mktemp("tiny_sd3_ckpt")), t5=False)


@pytest.fixture(scope="module")
def reward_name():
    with tiny_reward_registered() as name:
        yield name


CASES = {"vggflow": [], "vggflow_pmp": [], "refl": [], "draft": [], "draft_k2": ["algo.variant=k", "algo.k=2"],
         "adjoint_matching": []}


def _trainer(sd3_dir, tmp_path, algo: str, extra: list[str], checkpointing: bool, reward: str):
    from omegaconf import open_dict

    from align.setup.assemble import build_trainer
    from align.setup.compose import compose_config

    run_dir = str(tmp_path / f"run_{algo}_{int(checkpointing)}")
    overrides = [f"algo={algo}", "model=sd3", "reward=aesthetic", f"model.pretrained={sd3_dir}",
                 "model.dtype=bfloat16", f"model.gradient_checkpointing={str(checkpointing).lower()}",
                 f"model.resolution={RESOLUTION}", "model.decoder=vae", "model.t5=false",
                 "model.features.kind=pixels", "model.value_net.block_out_channels=[8,16]",
                 "model.value_net.attention_head_dim=4", "prompts=hpdv2", "sampler.steps=4", "train.steps=2",
                 "train.batch_size=2", "train.progress=false", "eval.every=0", "eval.n_samples=2",
                 "eval.group_size=2", "eval.final_samples=2", "device=cpu", *extra]
    if algo in ("vggflow", "vggflow_pmp"):
        overrides.append("algo.subsample_bins=2")
    cfg = compose_config(overrides, run_dir=run_dir)
    with open_dict(cfg):
        cfg.reward = {"name": reward, "offset": 10.0}    # r > 0: DRaFT's / ReFL's −ReLU(r) is active
    return build_trainer(cfg, run_dir)


def _first_update_grads(trainer, monkeypatch) -> tuple[list[torch.Tensor], dict]:
    """Run one update; the raw gradients of every trained parameter, taken when the trainer starts clipping."""
    grads: list[list[torch.Tensor]] = []
    clip = torch.nn.utils.clip_grad_norm_
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]

    def recording_clip(*a, **kw):
        if not grads:
            grads.append([p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params])
        return clip(*a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    row = trainer.update()
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    assert grads and row["skipped"] == 0, f"the first update was skipped: {row}"
    return grads[0], row


@pytest.mark.parametrize("case", list(CASES))
def test_checkpointing_in_bf16_trains_and_gives_the_same_gradients(sd3_dir, tmp_path, case, reward_name,
                                                                   monkeypatch):
    torch.set_num_threads(1)
    algo = case.split("_k")[0]
    results = {}
    for ckpt in (False, True):
        trainer = _trainer(sd3_dir, tmp_path, algo, CASES[case], ckpt, reward_name)
        tr = trainer.model.transformer
        assert tr.dtype == torch.bfloat16 and bool(tr.gradient_checkpointing) == ckpt
        grads, row = _first_update_grads(trainer, monkeypatch)
        row2 = trainer.update()                                         # the second update runs too
        assert row2["skipped"] == 0 and math.isfinite(row2["loss"]), row2
        results[ckpt] = grads, row
    (g_off, row_off), (g_on, row_on) = results[False], results[True]
    flat_off = torch.cat([g.float().flatten() for g in g_off])
    flat_on = torch.cat([g.float().flatten() for g in g_on])
    norm = flat_off.norm().item()
    diff = (flat_on - flat_off).norm().item()
    print(f"{case}: |g| = {norm:.4g}, |g_ckpt − g| = {diff:.3g} (rel {diff / max(norm, 1e-30):.2e}); "
          f"loss {row_off['loss']:.6g} vs {row_on['loss']:.6g}")
    assert norm > 0 and math.isfinite(norm)
    assert math.isclose(row_on["loss"], row_off["loss"], rel_tol=1e-3, abs_tol=1e-6)
    # Recomputation in bf16 on the CPU is deterministic: the tolerance (0.1 % of |g|, bf16 has 8 bits) is far
    # below the effect of the update itself (a gradient differs from zero by 100 %).
    assert diff <= 1e-3 * norm, (case, diff, norm)


@pytest.fixture(scope="module")
def sd35_dir(tmp_path_factory) -> str:
    from helpers.tiny_sd35 import build_tiny_sd35

    return build_tiny_sd35(str(tmp_path_factory.mktemp("tiny_sd35_ckpt")), variant="medium", t5=False)


@pytest.mark.parametrize("which", ["sd3", "sd35_medium"])
def test_base_velocity_jacobian_under_checkpointing_is_the_lora_free_transformers(request, which):
    """VJP of v_base in x, checkpointing on, LoRA perturbed (so "LoRA on" would differ) = the VJP of diffusers'
    own SD3Transformer2DModel loaded without any adapter, CFG combined as the pipeline does (w = 5). SD3.5-medium:
    dual-attention blocks (LoRA on attn2 too) and QK-norm."""
    from diffusers import SD3Transformer2DModel

    from align.core.registry import MODELS

    sd3_dir = request.getfixturevalue({"sd3": "sd3_dir", "sd35_medium": "sd35_dir"}[which])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MODELS.get("sd3")(pretrained=sd3_dir, dtype="float32", resolution=RESOLUTION, decoder="vae", t5=False,
                              features={"kind": "pixels"}, keep_text_encoders=True,
                              gradient_checkpointing=True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    plain = SD3Transformer2DModel.from_pretrained(sd3_dir, subfolder="transformer").eval()
    prompts = ["a photo of a cat", "a dog in the snow"]
    cond, neg = model.encode(prompts), model.negative_cond(2)
    x = model.sample_noise(2, torch.Generator().manual_seed(3)).requires_grad_(True)
    t = torch.tensor([0.3, 0.8])
    a = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))

    (g_ours,) = torch.autograd.grad((a * model.base_velocity(x, t, cond)).sum(), x)
    (g_lora,) = torch.autograd.grad((a * model.velocity(x, t, cond)).sum(), x)

    def u(net, c):
        return net(hidden_states=x, encoder_hidden_states=c["encoder_hidden_states"],
                   pooled_projections=c["pooled_projections"], timestep=1000.0 * (1 - t), return_dict=False)[0]

    u_cfg = u(plain, neg) + 5.0 * (u(plain, cond) - u(plain, neg))
    (g_ref,) = torch.autograd.grad((a * -u_cfg).sum(), x)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-5, rtol=1e-4)
    assert (g_lora - g_ref).abs().max() > 100 * (g_ours - g_ref).abs().max()      # LoRA on is far away
