"""``SD3Model.decode`` against ``StableDiffusion3Pipeline`` holding the same autoencoder.

The pipeline decodes with ``latents / vae.config.scaling_factor + vae.config.shift_factor`` of whichever
autoencoder it holds and post-processes ``output_type="pt"`` to [0, 1]; TAESD3 (AutoencoderTiny) carries scaling 1
and shift 0 (it decodes the diffusion latents themselves), the SD3 VAE 1.5305 / 0.0609. Expected images come from
the pipeline itself, run on the tiny random SD3 of tests/helpers/tiny_sd3.py with the tiny TAESD3 or the tiny VAE.
"""
from __future__ import annotations

import pytest
import torch

from align.core.registry import MODELS
from helpers.tiny_sd3 import RESOLUTION, SCALING_FACTOR, SHIFT_FACTOR, build_tiny_sd3, build_tiny_taesd3

torch.set_num_threads(1)
PROMPTS = ["a photo of a cat", "a dog in the snow"]


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> str:
    return build_tiny_sd3(str(tmp_path_factory.mktemp("tiny_sd3_decode")), t5=False)


@pytest.fixture(scope="module")
def taesd_dir(tmp_path_factory) -> str:
    return build_tiny_taesd3(str(tmp_path_factory.mktemp("tiny_taesd3_decode")))


def test_tiny_taesd3_carries_autoencoder_tiny_defaults(taesd_dir):
    """The fixture's factors are the ones diffusers' AutoencoderTiny (and madebyollin/taesd3) use, not the VAE's."""
    import inspect

    from diffusers import AutoencoderTiny

    defaults = inspect.signature(AutoencoderTiny.__init__).parameters
    cfg = AutoencoderTiny.load_config(taesd_dir)
    assert cfg["scaling_factor"] == defaults["scaling_factor"].default == 1.0
    assert cfg["shift_factor"] == defaults["shift_factor"].default == 0.0
    assert cfg["latent_channels"] == 16


@pytest.mark.parametrize("decoder", ["taesd3", "vae"])
def test_decode_equals_the_pipeline_with_the_same_autoencoder(sd3_dir, taesd_dir, decoder):
    from diffusers import AutoencoderTiny, StableDiffusion3Pipeline

    torch.manual_seed(0)
    model = MODELS.get("sd3")(pretrained=sd3_dir, dtype="float32", resolution=RESOLUTION, decoder=decoder,
                              taesd3_path=taesd_dir, t5=False, features={"kind": "pixels"},
                              keep_text_encoders=True)
    kw = {"text_encoder_3": None, "tokenizer_3": None}
    if decoder == "taesd3":
        kw["vae"] = AutoencoderTiny.from_pretrained(taesd_dir, dtype=torch.float32)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, dtype=torch.float32, **kw)
    assert type(pipe.vae).__name__ == ("AutoencoderTiny" if decoder == "taesd3" else "AutoencoderKL")
    gen = torch.Generator().manual_seed(3)
    x0 = 2.0 * torch.randn(len(PROMPTS), *model.data_shape, generator=gen)
    call = dict(prompt=PROMPTS, num_inference_steps=2, guidance_scale=5.0, height=RESOLUTION, width=RESOLUTION)
    with torch.no_grad():
        latents = pipe(output_type="latent", latents=x0.clone(), **call).images
        ref = pipe(output_type="pt", latents=x0.clone(), **call).images
        ours = model.decode(latents)
        # the SD3 VAE's factors in front of the decoder: what decode() did for TAESD3 before the fix
        vae_factors = (model.decoder.decode(latents / SCALING_FACTOR + SHIFT_FACTOR).sample / 2 + 0.5).clamp(0, 1)
    assert ours.shape == ref.shape == (len(PROMPTS), 3, RESOLUTION, RESOLUTION)
    assert ref.std() > 1e-3
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    if decoder == "taesd3":                                   # the check can tell the two conventions apart
        assert (vae_factors - ref).abs().max() > 1e-3
