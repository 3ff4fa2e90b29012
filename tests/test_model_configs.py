"""A model is built from its config dataclass: the constructor takes the config (or keyword overrides of its
fields) and has no defaults of its own, so a model built without a value has the dataclass's, as the runner's."""
import dataclasses
import inspect

import pytest
import torch
from omegaconf import OmegaConf

from align.core.registry import MODELS
from align.setup.build import build_model
from align.setup.compose import compose_config
from helpers.tiny_flux import build_tiny_flux, load_flux
from helpers.tiny_sd3 import build_tiny_sd3, load_model as load_sd3

REGISTERED = MODELS.names()
NOT_CONFIG = {"digits": {"pretrained"}}      # constructor arguments that are deliberately not config keys


def test_the_built_in_models_are_registered():
    assert {"digits", "flux", "gmm", "sd3"} <= set(REGISTERED)


@pytest.mark.parametrize("name", REGISTERED)
def test_the_constructor_takes_the_config_and_overrides_only(name):
    cls, schema = MODELS.get(name), MODELS.config(name)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]      # without self
    assert params[0].name == "cfg" and params[0].default is None
    assert params[-1].kind is inspect.Parameter.VAR_KEYWORD
    others = params[1:-1]
    assert {p.name for p in others} == NOT_CONFIG.get(name, set())
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in others)
    assert not {p.name for p in others} & {f.name for f in dataclasses.fields(schema)}


@pytest.mark.parametrize("name", REGISTERED)
def test_an_unknown_key_raises_naming_the_model(name):
    with pytest.raises(TypeError, match=rf"^model={name}: unknown setting\(s\) no_such_key; valid keys: .*grid"):
        MODELS.get(name)(no_such_key=1)


def test_gmm_defaults_are_the_dataclass_and_build_model_passes_the_section():
    torch.manual_seed(0)
    direct = MODELS.get("gmm")(hidden=16).double()
    assert direct.dim == 2 and direct.depth == 3 and direct.hidden == 16
    torch.testing.assert_close(direct.mu, torch.tensor([[-1.5, 0.0], [1.5, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(direct.cov, 0.25 * torch.eye(2, dtype=torch.float64).expand(2, 2, 2))
    for cfg in (compose_config(["model=gmm", "model.hidden=16"]),          # typed, as the runner's
                OmegaConf.create({"model": {"name": "gmm", "hidden": 16}})):  # untyped
        torch.manual_seed(0)
        built = build_model(cfg).double()
        assert built.state_dict().keys() == direct.state_dict().keys()
        assert all(torch.equal(built.state_dict()[k], v) for k, v in direct.state_dict().items())
    with pytest.raises(ValueError, match="model.weights must all be positive"):
        build_model(OmegaConf.create({"model": {"name": "gmm", "weights": [-1.0, 1.0]}}))


def test_digits_defaults_are_the_dataclass():
    model = MODELS.get("digits")(pretrained=False)
    assert model.guidance_scale == 2.0 and model.grid == "sd3"
    assert model.value_net_kwargs == {"block_out_channels": [16, 32], "attention_head_dim": 8, "out_scale": 1.0e-3}


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> str:
    return build_tiny_sd3(str(tmp_path_factory.mktemp("tiny_sd3")), t5=False)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> str:
    return build_tiny_flux(str(tmp_path_factory.mktemp("tiny_flux")))


SCALED_DOWN_UNET = {"block_out_channels": [64, 128, 256, 256], "layers_per_block": 1, "attention_head_dim": 8,
                    "out_scale": 1.0e-3}


def test_sd3_defaults_are_the_dataclass(sd3_dir):
    model = load_sd3(sd3_dir)
    assert model.forward_batch_size == 16 and model.decode_batch_size == 8 and model.reward_grad_batch_size is None
    assert model.guidance_scale == 5.0 and model.grid == "sd3" and model.value_net_kwargs == SCALED_DOWN_UNET
    assert load_sd3(sd3_dir, forward_batch_size=None).forward_batch_size is None


def test_flux_defaults_are_the_dataclass(flux_dir):
    model = load_flux(flux_dir)
    assert model.forward_batch_size == 8 and model.decode_batch_size == 4 and model.reward_grad_batch_size is None
    assert model.guidance_scale == 3.5 and model.grid == "flux" and model.exact_timesteps
    assert model.value_net_kwargs == SCALED_DOWN_UNET


@pytest.mark.parametrize("name, key, value, needle", [
    ("sd3", "dtype", "fp64", "dtype"), ("sd3", "decoder", "vqgan", "decoder"), ("flux", "decoder", "taesd3", "decoder"),
    ("flux", "reward_grad_batch_size", 0, "model.reward_grad_batch_size must be >= 1"),
    ("flux", "max_sequence_length", 513, "model.max_sequence_length=513: FLUX takes 1..512 T5 tokens")])
def test_bad_values_are_refused_before_any_weights_load(name, key, value, needle):
    with pytest.raises(ValueError, match=needle):
        MODELS.get(name)(pretrained="/no/such/checkpoint", **{key: value})
