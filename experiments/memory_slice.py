"""Activation memory of a forward with grad of FLUX.1-dev (and SD3-medium), measured on CPU on a slice.

Builds the real layer sizes from the published configs (random weights: memory does not depend on their values),
with the LoRA this project trains (peft r = 8, α = 8, gaussian, on to_q/to_k/to_v/to_out.0, fp32, the only trainable
tensors; the base weights frozen in bf16), runs one forward with grad for batch 1 and counts the bytes autograd saves
for backward (``torch.autograd.graph.saved_tensors_hooks``; storages deduplicated by ``data_ptr``, counted by
``untyped_storage().nbytes()``; parameters and buffers excluded: they are weights, not activations). Then the
backward runs (so that the peak RSS is the training step's) and the per-block figures are scaled to the full depth.

* transformer slice: FLUX.1-dev with 2 double + 1 single blocks (full: 19 + 38), SD3-medium with 3 joint blocks
  (full: 24; the last one is context_pre_only). Two double blocks, not one: the first block's text stream does not
  require grad before its attention (the text embeddings are frozen inputs; only the LoRA'd image projections
  carry θ), so it saves ≈ 17 MB less at 256² than every later double block, which the 2nd one represents. Each
  saved storage is attributed to the block whose forward saved it (forward hooks); one saved by several blocks
  (the time embedding, the rotary tables) or by none (embedders, final layer) is ``other``, counted once at full
  depth. A block's input is saved by that block, so
      FLUX: full = double_first + 18 · double + 38 · single + other,
      SD3:  full = joint_first + 22 · joint + joint_last + other
  (checked: a 2 + 2 FLUX slice saves exactly double_first + double + 2 · single + other).
* attention: the fused SDPA kernel (``--`` flash attention for CPU, which saves q, k, v, the output and the
  log-sum-exp, as the GPU flash / memory-efficient kernels do) and the math kernel (which also saves the softmax
  matrix, quadratic in tokens) are measured separately; "attention matrices" = math − fused. A GPU with the fused
  kernels (PyTorch's default there) holds only the fused figure.
* gradient checkpointing (``align.models.flow_transformer.enable_gradient_checkpointing``, diffusers' hook with
  torch's non-reentrant checkpoint): the blocks' inputs are held by the checkpoint (counted here through the
  checkpoint function's tensor arguments), nothing inside them; the backward recomputes one block at a time, so
  its peak adds one block's activations: peak ≈ kept + max(double, single).
* decoders, fp32, decode only, input latents requiring grad: the FLUX VAE (``AutoencoderKL``, FLUX.1-dev's vae
  config) and a TAEF1-shaped ``AutoencoderTiny`` (TAESD3 has the same architecture). The VAE at 1024² would need
  ≈ 20 GB of RAM, so it is measured at ``--vae-resolution`` (512) and scaled: convolutions and norms are linear in
  pixels (× (R/r)²), its mid-block attention matrix is quadratic (× (R/r)⁴). With checkpointing (mid block and up
  blocks) the same scaling applies.
* also: HPSv2's image tower (open_clip ViT-H-14 visual, fp32, the project's clip_preprocess from the R² image) and
  VGG-Flow's value network (the FLUX backend's ValueUNet, fp32) at batch 1, for the per-algorithm sums.

Every measurement runs in its own process (spawn), so its peak RSS (``resource.getrusage``) is its own.

    python experiments/memory_slice.py                       # FLUX, 1024² (≈ 4 min on 2 CPU cores)
    python experiments/memory_slice.py --what all --json /tmp/mem.json
    python experiments/memory_slice.py --what sd3 --resolution 512

Results and the per-algorithm estimates built from them: docs/flux.md#hardware-and-memory and, for SD3-medium
(``--what all``: its table needs the decoders, tower and ν_φ measured with FLUX), docs/sd3.md#hardware-and-memory
(the method's bookkeeping is checked by tests/test_memory_slice.py on tiny FLUX transformers).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import resource
import sys
import time
from typing import Any, Callable, Iterator

GB = 1e9

FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                            pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_DEV_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                    layers_per_block=2, act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024,
                    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
                    force_upcast=True, mid_block_add_attention=True)
TAEF1 = dict(in_channels=3, out_channels=3, encoder_block_out_channels=[64] * 4, decoder_block_out_channels=[64] * 4,
             act_fn="relu", upsample_fn="nearest", latent_channels=16, upsampling_scaling_factor=2,
             num_encoder_blocks=[1, 3, 3, 3], num_decoder_blocks=[3, 3, 3, 1], latent_magnitude=3, latent_shift=0.5,
             scaling_factor=1.0, shift_factor=0.0)
SD3_MEDIUM_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                              num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                              pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
FLUX_TEXT_TOKENS, SD3_TEXT_TOKENS = 512, 77 + 256
LORA_RANK = 8


# ---- counting saved tensors -------------------------------------------------------------------------------
class SavedTensors:
    """Bytes of the storages autograd saves for backward, deduplicated by data_ptr, attributed to the block whose
    forward saved them (``label``); the storages in ``exclude`` (parameters, buffers) are not counted."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.labels: list[str | None] = [None]     # a stack: the innermost block being run
        self.active = False
        self.entries: dict[int, list[Any]] = {}      # data_ptr -> [nbytes, {labels}]

    def add(self, t: Any, label: str | None = None) -> None:
        import torch

        if not self.active or not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            return
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr == 0 or ptr in self.exclude:
            return
        entry = self.entries.setdefault(ptr, [0, set()])
        entry[0] = max(entry[0], s.nbytes())
        entry[1].add(self.labels[-1] if label is None else label)

    def pack(self, t: Any) -> Any:
        self.add(t)
        return t

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        import torch

        self.active = True
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
                yield
        finally:
            self.active = False

    def label_blocks(self, blocks: dict[str, Any]) -> None:
        for name, module in blocks.items():
            module.register_forward_pre_hook(lambda m, a, name=name: self.labels.append(name))
            module.register_forward_hook(lambda m, a, o: self.labels.pop() and None)   # None: output unchanged

    def by_label(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for nbytes, labels in self.entries.values():
            key = next(iter(labels)) if len(labels) == 1 else None
            key = "other" if key is None else key
            out[key] = out.get(key, 0) + nbytes
        return out


def labelled_checkpoint(counter: SavedTensors, labels: dict[int, str], inner: Callable[..., Any]
                        ) -> Callable[..., Any]:
    """A diffusers ``gradient_checkpointing_func`` under which the tensors the checkpoint itself saves (the block's
    inputs: torch's non-reentrant checkpoint saves them through the saved-tensor hooks, while the block's own saves
    go to the checkpoint's inner hooks and are dropped) are attributed to the block."""

    def run(module: Any, *args: Any, **kwargs: Any) -> Any:
        counter.labels.append(labels.get(id(module)))
        try:
            return inner(module, *args, **kwargs)
        finally:
            counter.labels.pop()

    return run


def plain_checkpoint(module: Any, *args: Any, **kwargs: Any) -> Any:
    import torch.utils.checkpoint

    return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False, **kwargs)


def weight_ptrs(*modules: Any) -> set[int]:
    out = set()
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            out.add(t.untyped_storage().data_ptr())
    return out


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def rss_now() -> int:
    """The current RSS, after resetting the peak (VmHWM) to it (Linux: clear_refs 5), so that ``rss_peak`` is the
    peak of what runs next, not of the model's construction; falls back to getrusage's lifetime peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status("VmRSS")


def rss_peak() -> int:
    try:
        return _status("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def attention_kernel(kind: str) -> Iterator[None]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel({"fused": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}[kind]):
        yield


def add_lora(transformer: Any) -> int:
    """This project's LoRA (align.models.flow_transformer): frozen base, fp32 trainable adapters; its size."""
    import torch
    from align.models.flow_transformer import lora_config, lora_parameters

    transformer.requires_grad_(False)
    transformer.add_adapter(lora_config(LORA_RANK, 8.0))
    n = 0
    for p in lora_parameters(transformer):
        p.data = p.data.float()
        p.requires_grad_(True)
        n += p.numel()
    assert n == lora_count(transformer), (n, lora_count(transformer))
    return n


def lora_count(model: Any, rank: int = LORA_RANK) -> int:
    """r·(in + out) summed over the base Linear layers peft's suffix match targets (to_q/to_k/to_v/to_out.0)."""
    import torch
    from align.models.flow_transformer import LORA_TARGET_MODULES

    n = 0
    for name, m in model.named_modules():
        if "lora_" in name or "base_layer" in name:
            continue
        m = getattr(m, "base_layer", m)
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in LORA_TARGET_MODULES):
            n += rank * (m.in_features + m.out_features)
    return n


# ---- the measurements (each in its own process) --------------------------------------------------------------
def flux_inputs(config: dict[str, Any], res: int, text_tokens: int, dtype: Any) -> dict[str, Any]:
    """FluxTransformer2DModel's call at ``res``² (VAE factor 8, 2×2 packing: (res/16)² image tokens), batch 1."""
    import torch
    from diffusers import FluxPipeline

    h = res // 16
    return dict(hidden_states=torch.randn(1, h * h, config["in_channels"], dtype=dtype),
                encoder_hidden_states=torch.randn(1, text_tokens, config["joint_attention_dim"], dtype=dtype),
                pooled_projections=torch.randn(1, config["pooled_projection_dim"], dtype=dtype),
                timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]) if config["guidance_embeds"] else None,
                img_ids=FluxPipeline._prepare_latent_image_ids(1, h, h, "cpu", dtype),
                txt_ids=torch.zeros(text_tokens, 3, dtype=dtype))


def measure_transformer(net: Any, blocks: dict[str, Any], kw: dict[str, Any], attn: str, ckpt: bool
                        ) -> dict[str, Any]:
    """LoRA (this project's) on ``net``, one forward with grad on ``kw`` under the ``attn`` kernel, with or without
    gradient checkpointing; the saved bytes by block label, then the backward (for the RSS peak)."""
    from align.models.flow_transformer import adapter_aware_checkpoint

    n_lora = add_lora(net)
    counter = SavedTensors(weight_ptrs(net))
    counter.label_blocks(blocks)
    if ckpt:
        labels = {id(m): name for name, m in blocks.items()}
        net.enable_gradient_checkpointing(
            gradient_checkpointing_func=labelled_checkpoint(counter, labels, adapter_aware_checkpoint))
    before = rss_now()
    with attention_kernel(attn), counter.recording():
        out = net(**kw, return_dict=False)[0]
    peak_fwd = rss_peak()
    with attention_kernel(attn):
        out.float().pow(2).mean().backward()
    return {"by_label": counter.by_label(), "lora_params_slice": n_lora,
            "rss_before": before, "rss_peak_fwd": peak_fwd, "rss_peak": rss_peak()}


def _transformer_job(kind: str, res: int, attn: str, ckpt: bool) -> dict[str, Any]:
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    bf = torch.bfloat16
    if kind == "flux":
        cfg = {**FLUX_DEV_TRANSFORMER, "num_layers": 2, "num_single_layers": 1}
        net = FluxTransformer2DModel(**cfg).to(bf).eval()
        blocks = {"double_first": net.transformer_blocks[0], "double": net.transformer_blocks[1],
                  "single": net.single_transformer_blocks[0]}
        kw = flux_inputs(cfg, res, FLUX_TEXT_TOKENS, bf)
        tokens = (res // 16) ** 2 + FLUX_TEXT_TOKENS
    else:
        side = res // 8
        net = SD3Transformer2DModel(**{**SD3_MEDIUM_TRANSFORMER, "num_layers": 3}).to(bf).eval()
        blocks = {"joint_first": net.transformer_blocks[0], "joint": net.transformer_blocks[1],
                  "joint_last": net.transformer_blocks[2]}
        kw = dict(hidden_states=torch.randn(1, 16, side, side, dtype=bf),
                  encoder_hidden_states=torch.randn(1, SD3_TEXT_TOKENS, 4096, dtype=bf),
                  pooled_projections=torch.randn(1, 2048, dtype=bf), timestep=torch.tensor([500.0]))
        tokens = (side // 2) ** 2 + SD3_TEXT_TOKENS
    return {**measure_transformer(net, blocks, kw, attn, ckpt), "tokens": tokens}


def _decoder_job(kind: str, res: int, attn: str, ckpt: bool) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny

    torch.manual_seed(0)
    if kind == "vae":
        ae = AutoencoderKL(**FLUX_DEV_VAE)
        blocks = {"mid": ae.decoder.mid_block, **{f"up{i}": b for i, b in enumerate(ae.decoder.up_blocks)}}
    else:
        ae = AutoencoderTiny(**TAEF1)
        blocks = {}
    ae = ae.float().eval().requires_grad_(False)
    counter = SavedTensors(weight_ptrs(ae))
    counter.label_blocks(blocks)
    if ckpt:
        labels = {id(m): name for name, m in blocks.items()}
        ae.enable_gradient_checkpointing(gradient_checkpointing_func=labelled_checkpoint(counter, labels,
                                                                                         plain_checkpoint))
    z = torch.randn(1, 16, res // 8, res // 8, requires_grad=True)
    before = rss_now()
    with attention_kernel(attn), counter.recording():
        img = ae.decode(z).sample
    peak_fwd = rss_peak()
    with attention_kernel(attn):
        img.float().mean().backward()
    return {"by_label": counter.by_label(), "params": sum(p.numel() for p in ae.parameters()),
            "decoder_params": sum(p.numel() for p in ae.decoder.parameters()),
            "rss_before": before, "rss_peak_fwd": peak_fwd, "rss_peak": rss_peak()}


def _hpsv2_tower_job(res: int) -> dict[str, Any]:
    import open_clip
    import torch
    from open_clip.model import _build_vision_tower
    from align.metrics.clip import clip_preprocess

    torch.manual_seed(0)
    cfg = open_clip.get_model_config("ViT-H-14")
    visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"]).float().eval().requires_grad_(False)
    counter = SavedTensors(weight_ptrs(visual))
    img = torch.rand(1, 3, res, res, requires_grad=True)
    before = rss_now()
    with attention_kernel("fused"), counter.recording():
        feats = visual(clip_preprocess(img, size=224))
    peak_fwd = rss_peak()
    feats.float().sum().backward()
    return {"by_label": counter.by_label(), "params": sum(p.numel() for p in visual.parameters()),
            "rss_before": before, "rss_peak_fwd": peak_fwd, "rss_peak": rss_peak()}


def _value_net_job(res: int) -> dict[str, Any]:
    import torch
    from align.models.flux import FluxConfig
    from align.models.value_unet import ValueUNet

    torch.manual_seed(0)
    side = res // 8
    net = ValueUNet(channels=16, sample_size=side, cross_attention_dim=4096,
                    **FluxConfig().value_net).float().train()
    counter = SavedTensors(weight_ptrs(net))
    x = torch.randn(1, 16, side, side)
    cond = {"encoder_hidden_states": torch.randn(1, FLUX_TEXT_TOKENS, 4096)}
    before = rss_now()
    with attention_kernel("fused"), counter.recording():
        out = net(x, torch.tensor([0.5]), cond)
    peak_fwd = rss_peak()
    with attention_kernel("fused"):
        out.pow(2).mean().backward()
    return {"by_label": counter.by_label(), "params": sum(p.numel() for p in net.parameters()),
            "rss_before": before, "rss_peak_fwd": peak_fwd, "rss_peak": rss_peak()}


def full_model_sizes() -> dict[str, int]:
    """Parameter counts of the full FLUX.1-dev transformer (and its LoRA) and SD3-medium's, on the meta device."""
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    with torch.device("meta"):
        flux = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
        sd3 = SD3Transformer2DModel(**SD3_MEDIUM_TRANSFORMER)
    return {"flux_params": sum(p.numel() for p in flux.parameters()), "flux_lora_params": lora_count(flux),
            "sd3_params": sum(p.numel() for p in sd3.parameters()), "sd3_lora_params": lora_count(sd3)}


JOBS: dict[str, Callable[..., dict[str, Any]]] = {
    "transformer": _transformer_job, "decoder": _decoder_job, "hpsv2_tower": _hpsv2_tower_job,
    "value_net": _value_net_job, "sizes": full_model_sizes}


def _child(job: str, threads: int, args: tuple) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    t0 = time.time()
    out = JOBS[job](*args)
    out["seconds"] = time.time() - t0
    return out


def run(job: str, threads: int, *args: Any) -> dict[str, Any]:
    """One measurement in a fresh process (its own peak RSS)."""
    print(f"  {job}{args} ...", end="", file=sys.stderr, flush=True)
    with mp.get_context("spawn").Pool(1) as pool:
        out = pool.apply(_child, (job, threads, args))
    print(f" {out['seconds']:.0f} s", file=sys.stderr, flush=True)
    return out


# ---- composing the full-depth figures ---------------------------------------------------------------------------
def transformer_full(kind: str, fused: dict, math_: dict, ckpt: dict) -> dict[str, Any]:
    """Per block and full depth (bytes): fused kernels, attention matrices (math − fused), checkpointed."""
    f, m, c = fused["by_label"], math_["by_label"], ckpt["by_label"]
    if kind == "flux":
        depth = {"double_first": 1, "double": 18, "single": 38}
    else:
        depth = {"joint_first": 1, "joint": 22, "joint_last": 1}
    full = sum(n * f.get(b, 0) for b, n in depth.items()) + f.get("other", 0)
    full_math = sum(n * m.get(b, 0) for b, n in depth.items()) + m.get("other", 0)
    kept = sum(n * c.get(b, 0) for b, n in depth.items()) + c.get("other", 0)
    biggest = max(f.get(b, 0) for b in depth)
    return {"depth": depth, "blocks": {b: f.get(b, 0) for b in depth},
            "blocks_attn": {b: m.get(b, 0) - f.get(b, 0) for b in depth},
            "blocks_ckpt": {b: c.get(b, 0) for b in depth}, "other": f.get("other", 0),
            "other_ckpt": c.get("other", 0), "full": full, "full_attn": full_math - full, "full_math": full_math,
            "ckpt_kept": kept, "ckpt_peak": kept + biggest, "tokens": fused["tokens"],
            "rss": {k: (r["rss_peak"] - r["rss_before"]) for k, r in (("fused", fused), ("math", math_),
                                                                        ("ckpt", ckpt))}}


def vae_scaled(fused: dict, math_: dict, ckpt: dict, measured_res: int, res: int) -> dict[str, Any]:
    """Decode figures at ``res`` from a measurement at ``measured_res``: linear part × (R/r)², attention × (R/r)⁴."""
    s2, s4 = (res / measured_res) ** 2, (res / measured_res) ** 4
    f, m, c = fused["by_label"], math_["by_label"], ckpt["by_label"]
    lin = sum(f.values())
    attn = sum(m.values()) - lin
    blocks = {b: v * s2 for b, v in f.items() if b != "other"}
    blocks_math = {b: blocks[b] + (m.get(b, 0) - f.get(b, 0)) * s4 for b in blocks}
    kept = sum(c.values()) * s2
    return {"measured_res": measured_res, "measured_fused": lin, "measured_attn": attn, "fused": lin * s2,
            "attn": attn * s4, "math": lin * s2 + attn * s4, "blocks": blocks, "ckpt_kept": kept,
            "ckpt_peak": kept + max(blocks.values()), "ckpt_peak_math": kept + max(blocks_math.values()),
            "params": fused["params"], "decoder_params": fused["decoder_params"],
            "rss_measured": fused["rss_peak"] - fused["rss_before"]}


def algorithm_estimates(tf: dict, dec: dict[str, dict], tower: float, vnet: float, sizes: dict, res: int,
                        kind: str = "flux") -> list[dict[str, Any]]:
    """Peak GPU memory per micro-batch of one trajectory (GB), fused attention kernels, without / with
    ``model.gradient_checkpointing`` (which also checkpoints the VAE's mid and up blocks).

    ``kind="sd3"``: SD3-medium with CFG (its default w = 5): under grad the unconditional branch keeps only x and
    its backward recomputes it with a graph to x (align/models/flow_transformer.py), so every transformer pass with
    grad is counted twice (an upper bound: the two graphs need not be alive together); the decoders are FLUX's
    (SD3's VAE has the same decoder, TAESD3 TAEF1's architecture) and ν_φ the FLUX measurement (same latent grid)."""
    T, Tk, blk = tf["full"] / GB, tf["ckpt_kept"] / GB, max(tf["blocks"].values()) / GB
    if kind == "sd3":
        T, Tk, blk = 2 * T, 2 * Tk, 2 * blk
    lora = sizes[f"{kind}_lora_params"] * 16 / GB       # fp32 weight + grad + Adam's two moments
    base = sizes[f"{kind}_params"] * 2 / GB + lora + 3.9 + 1.2   # transformer bf16, HPSv2 ViT-H-14 + ViT-L/14 features
    vn_weights = 0.6

    def decode(name: str, n: int, ck: bool) -> float:
        d = dec[name]
        if not ck or name == "taef1":                # TAEF1 checkpoints its whole decoder as one segment: no gain
            return n * (d["fused"] / GB + tower)
        per_chunk = min(n, 4)                        # decode_batch_size 4: one chunk's largest block recomputed
        return n * (d["ckpt_kept"] / GB + tower) + per_chunk * max(d["blocks"].values()) / GB

    def dec_weights(name: str) -> float:
        return dec[name]["params"] * 4 / GB

    rows = []

    def row(name: str, graph: str, n_tf: int, n_dec: int, extra: float = 0.0, sequential: bool = False,
            tf_with_decode: int = 1) -> None:
        for d in ("vae", "taef1"):
            w = base + dec_weights(d) + extra
            # checkpointed: the backward recomputes one block at a time, for all the graph's rows at once
            if sequential:      # decode+reward (with tf_with_decode T beside it) and the loss's graph apart
                no = w + max(n_tf * T, decode(d, n_dec, False) + T * tf_with_decode * bool(n_dec))
                ck = w + max(n_tf * (Tk + blk), decode(d, n_dec, True) + (Tk + blk) * tf_with_decode)
            else:
                no = w + n_tf * T + decode(d, n_dec, False)
                ck = w + n_tf * (Tk + blk) + decode(d, n_dec, True)
            rows.append({"algorithm": name, "decoder": d, "graph": graph, "no_ckpt": no, "ckpt": ck})
            if not n_dec:
                rows[-1]["decoder"] = "—"
                break

    # VGG-Flow: ν_φ with grad on 6 + 1 + 6 rows throughout the loss; g at the 6 perturbed states takes another
    # ∇r(decode(x̂)) (no-grad x̂), and only then v_θ runs with grad on the 6 states (5 bins + the last): the two
    # graphs are never alive together (algorithms/vggflow.py, tests/test_vggflow_graph_lifetimes.py).
    row("vggflow", "max(6 (decode + reward), 6 T) + 13 ν_φ", 6, 6, extra=vn_weights + 13 * vnet, sequential=True,
        tf_with_decode=0)
    # model.reward_grad_batch_size=1: those gradients one image at a time (one decode graph alive, not 6)
    row("vggflow (reward_grad_batch_size 1)", "max(1 (decode + reward), 6 T) + 13 ν_φ", 6, 1,
        extra=vn_weights + 13 * vnet, sequential=True, tf_with_decode=0)
    # VGG-Flow-PMP: ∇r(decode(x_N)) and one VJP (one T) per step in the sweep, then 6 states with grad.
    row("vggflow_pmp", "sweep: T + decode; loss: 6 T", 6, 1, sequential=True)
    # Adjoint Matching: the same sweep through v_base, then |K| = ⌈N/4⌉ + ⌈N/4⌉ = 10 states (N = 20).
    row("adjoint_matching", "sweep: T + decode; loss: 10 T", 10, 1, sequential=True)
    row("refl", "T + decode + reward", 1, 1)
    row("draft (LV, n = 2)", "2 T + 2 (decode + reward)", 2, 2)
    row("draft (K = 1)", "T + decode + reward", 1, 1)
    row("flow_grpo (N = 6)", "⌊0.99·6⌋ = 5 T", 5, 0)
    row("flow_grpo (N = 10, default)", "10 T", 10, 0)
    row("diffusion_nft (N = 20)", "⌊0.99·20⌋ = 19 T", 19, 0)
    row("diffusion_nft (N = 10)", "⌊0.99·10⌋ = 9 T", 9, 0)
    return rows


def fits(gb: float) -> str:
    return "40 GB" if gb <= 38 else "80 GB" if gb <= 76 else "> 80 GB"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--what", choices=["flux", "sd3", "all"], default="flux")
    ap.add_argument("--vae-resolution", type=int, default=None, help="where the FLUX VAE is measured (512)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write every measurement here")
    a = ap.parse_args(argv)
    R, th = a.resolution, a.threads
    vae_res = a.vae_resolution or min(R, 512)
    t0 = time.time()
    res: dict[str, Any] = {"resolution": R, "sizes": run("sizes", th)}
    kinds = ["flux", "sd3"] if a.what == "all" else [a.what]
    for kind in kinds:
        raw = {v: run("transformer", th, kind, R, attn, ck)
               for v, attn, ck in (("fused", "fused", False), ("math", "math", False), ("ckpt", "fused", True))}
        res[f"{kind}_raw"] = raw
        res[kind] = transformer_full(kind, raw["fused"], raw["math"], raw["ckpt"])
    raw = {v: run("decoder", th, "vae", vae_res, attn, ck)
           for v, attn, ck in (("fused", "fused", False), ("math", "math", False), ("ckpt", "fused", True))} \
        if "flux" in kinds else None
    if raw:
        res["vae_raw"] = raw
        res["vae"] = vae_scaled(raw["fused"], raw["math"], raw["ckpt"], vae_res, R)
    tae = run("decoder", th, "taef1", R, "fused", False)
    res["taef1"] = {"fused": sum(tae["by_label"].values()), "params": tae["params"],
                    "decoder_params": tae["decoder_params"], "rss": tae["rss_peak"] - tae["rss_before"]}
    if "flux" in kinds:
        tw = run("hpsv2_tower", th, R)
        res["hpsv2_tower"] = {"fused": sum(tw["by_label"].values()), "params": tw["params"],
                              "rss": tw["rss_peak"] - tw["rss_before"]}
        vn = run("value_net", th, R)
        res["value_net"] = {"fused": sum(vn["by_label"].values()), "params": vn["params"],
                            "rss": vn["rss_peak"] - vn["rss_before"]}
    res["seconds"] = time.time() - t0
    report(res, kinds)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1, default=list)
    return res


def report(res: dict[str, Any], kinds: list[str]) -> None:
    R, sz = res["resolution"], res["sizes"]

    def g(b: float) -> str:
        return f"{b / GB:7.2f}"

    print(f"\nSaved-for-backward bytes, batch 1, {R}² (GB = 1e9 B); fused = flash/efficient SDPA (what a GPU holds), "
          f"attn = the math kernel's extra softmax matrices (CPU math kernel only)")
    print(f"{'component':34s} {'fused':>7s} {'+attn':>7s} {'ckpt':>7s}   peak RSS − RSS before forward (fused run)")
    for kind in kinds:
        t = res[kind]
        for b, n in t["depth"].items():
            print(f"{kind + ' ' + b + ' block (×' + str(n) + ')':34s} {g(t['blocks'][b])} {g(t['blocks_attn'][b])} "
                  f"{g(t['blocks_ckpt'][b])}")
        print(f"{kind + ' other (embedders, final)':34s} {g(t['other'])} {'':7s} {g(t['other_ckpt'])}")
        print(f"{kind + ' FULL DEPTH (' + str(t['tokens']) + ' tokens)':34s} {g(t['full'])} {g(t['full_attn'])} "
              f"{g(t['ckpt_kept'])}   slice: {g(t['rss']['fused'])}; ckpt backward peak ≈ {g(t['ckpt_peak'])}")
    if "vae" in res:
        v = res["vae"]
        print(f"{'FLUX VAE decode (from ' + str(v['measured_res']) + '²)':34s} {g(v['fused'])} {g(v['attn'])} "
              f"{g(v['ckpt_kept'])}   at {v['measured_res']}²: {g(v['rss_measured'])}; ckpt peak ≈ "
              f"{g(v['ckpt_peak'])}; largest block {g(max(v['blocks'].values()))}")
    t = res["taef1"]
    print(f"{'TAEF1 / TAESD3 decode':34s} {g(t['fused'])} {'':7s} {'':7s}   {g(t['rss'])}")
    if "hpsv2_tower" in res:
        t = res["hpsv2_tower"]
        print(f"{'HPSv2 image tower (224²)':34s} {g(t['fused'])} {'':7s} {'':7s}   {g(t['rss'])}")
        t = res["value_net"]
        print(f"{'value network ν_φ':34s} {g(t['fused'])} {'':7s} {'':7s}   {g(t['rss'])}")
    print(f"\nparameters: FLUX.1-dev transformer {sz['flux_params'] / 1e9:.3f} B ({sz['flux_params'] * 2 / GB:.1f} GB "
          f"bf16), its LoRA {sz['flux_lora_params']:,} ({sz['flux_lora_params'] * 4 / GB * 1e3:.1f} MB fp32); "
          f"SD3-medium {sz['sd3_params'] / 1e9:.3f} B, LoRA {sz['sd3_lora_params']:,}")
    if "vae" in res:
        v, t = res["vae"], res["taef1"]
        print(f"FLUX VAE {v['params'] / 1e6:.1f} M ({v['params'] * 4 / GB:.2f} GB fp32; decoder "
              f"{v['decoder_params'] / 1e6:.1f} M), TAEF1 {t['params'] / 1e6:.2f} M, HPSv2 tower "
              f"{res['hpsv2_tower']['params'] / 1e6:.0f} M, ν_φ {res['value_net']['params'] / 1e6:.1f} M")
    for kind in [k for k in kinds if "flux" in kinds]:        # the decoders, tower and ν_φ come with flux
        dec = {"vae": res["vae"], "taef1": {"fused": res["taef1"]["fused"], "params": res["taef1"]["params"]}}
        rows = algorithm_estimates(res[kind], dec, res["hpsv2_tower"]["fused"] / GB,
                                   res["value_net"]["fused"] / GB, sz, R, kind)
        res[f"estimates_{kind}"] = rows
        title = ("FLUX.1-dev" if kind == "flux" else
                 "SD3-medium with CFG (each transformer pass with grad counted twice: the unconditional branch's "
                 "recomputation in backward; guidance 1 halves the transformer part)")
        print(f"\n{title}, {R}², peak GPU memory per micro-batch of one trajectory (GB, estimates; weights: "
              f"transformer bf16 + LoRA/Adam + HPSv2 + ViT-L/14 features + decoder [+ ν_φ with Adam])")
        print(f"{'algorithm':36s} {'decoder':7s} {'no ckpt':>8s} {'ckpt':>8s}  fits (no ckpt / ckpt)   graph")
        for r in rows:
            print(f"{r['algorithm']:36s} {r['decoder']:7s} {r['no_ckpt']:8.1f} {r['ckpt']:8.1f}  "
                  f"{fits(r['no_ckpt']):>7s} / {fits(r['ckpt']):7s}   {r['graph']}")
    print(f"\n({res['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
