"""The bookkeeping behind the FLUX memory estimates (experiments/memory_slice.py), on tiny FLUX transformers.

The estimates scale a measured slice (2 double + 1 single blocks) to 19 + 38 blocks; these tests check, with
closed forms and with a deeper slice measured directly, the three facts that scaling rests on: a deeper model
saves exactly the per-block figures more, a checkpointed block keeps exactly its two token streams, and the fused
attention kernel saves nothing quadratic in the tokens (the math kernel does).
"""
import pytest
import torch
from diffusers import FluxTransformer2DModel

from experiments.memory_slice import flux_inputs, lora_count, measure_transformer

TINY = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))
TEXT_TOKENS = 7
WIDTH = TINY["num_attention_heads"] * TINY["attention_head_dim"]


def measure(res: int, double: int = 2, single: int = 1, attn: str = "fused", ckpt: bool = False) -> dict:
    torch.manual_seed(0)
    cfg = {**TINY, "num_layers": double, "num_single_layers": single}
    net = FluxTransformer2DModel(**cfg).to(torch.bfloat16).eval()
    blocks = {"double_first": net.transformer_blocks[0], "double": net.transformer_blocks[1],
              "single": net.single_transformer_blocks[0]}
    out = measure_transformer(net, blocks, flux_inputs(cfg, res, TEXT_TOKENS, torch.bfloat16), attn, ckpt)
    return out["by_label"]


def test_a_deeper_model_saves_exactly_the_per_block_figures_more():
    per = measure(32)
    for double, single in ((2, 2), (3, 1), (3, 3)):
        deeper = measure(32, double, single)
        predicted = per["double_first"] + (double - 1) * per["double"] + single * per["single"] + per["other"]
        assert sum(deeper.values()) == predicted, (double, single, deeper, per)
    assert per["double"] > per["double_first"]       # the first block's text stream does not require grad yet


def test_a_checkpointed_block_keeps_exactly_its_image_and_text_tokens():
    res = 48
    kept = measure(res, ckpt=True)
    stream_bytes = ((res // 16) ** 2 + TEXT_TOKENS) * WIDTH * 2      # [1, tokens, width] bf16, both streams
    for block in ("double_first", "double", "single"):
        assert kept[block] == stream_bytes, (block, kept)
    assert sum(kept.values()) < sum(measure(res).values()) / 4


@pytest.mark.parametrize("attn", ["fused", "math"])
def test_only_the_math_kernel_saves_bytes_quadratic_in_the_tokens(attn):
    sizes = (16, 32, 48)                                              # 1, 4, 9 image tokens
    n = [(r // 16) ** 2 for r in sizes]
    f = [measure(r, attn=attn)["single"] for r in sizes]
    # affine in the image tokens ⇔ equal slopes over [n0, n1] and [n1, n2]
    lhs, rhs = (f[2] - f[1]) * (n[1] - n[0]), (f[1] - f[0]) * (n[2] - n[1])
    if attn == "fused":
        assert lhs == rhs, f
    else:
        # the softmax matrix [1, heads, L, L] (L = image + text tokens), bf16, at least once per block
        heads, L = TINY["num_attention_heads"], [k + TEXT_TOKENS for k in n]
        quad = [heads * x * x * 2 for x in L]
        assert lhs - rhs >= (quad[2] - quad[1]) * (n[1] - n[0]) - (quad[1] - quad[0]) * (n[2] - n[1]), f


def test_the_lora_count_is_peft_s():
    from align.models.flow_transformer import lora_config, lora_parameters

    net = FluxTransformer2DModel(**TINY)
    expected = lora_count(net)
    net.add_adapter(lora_config(8, 8.0))
    assert sum(p.numel() for p in lora_parameters(net)) == expected > 0
