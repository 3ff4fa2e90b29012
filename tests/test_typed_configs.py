"""Bad values are refused by the typed configs (align/core/schema.py; the algorithms', models' and rewards' config
dataclasses) before any work, in one line naming the key, the value and, for a choice, the valid ones."""
import pytest
import torch
from omegaconf import OmegaConf

from algorithms.adjoint_matching import AdjointMatching, AdjointMatchingConfig
from algorithms.diffusion_nft import DiffusionNFT, DiffusionNFTConfig
from algorithms.draft import DRaFT, DRaFTConfig
from algorithms.flow_grpo import FlowGRPO, FlowGRPOConfig
from algorithms.refl import ReFL, ReFLConfig
from algorithms.vggflow import VGGFlow, VGGFlowAuthors, VGGFlowConfig
from algorithms.vggflow_pmp import VGGFlowPMP, VGGFlowPMPConfig
from align.setup.overrides import ConfigProblem, check_overrides
from align.conf import CONF_DIR
from align.core.registry import ALGORITHMS
from align.setup.compose import compose_config
from align.core.schema import typed_config
from align.models.gmm import GaussianMixtureFlow, GMMConfig
from helpers.cli import align_run
from rewards.analytic import LinearReward
from samplers import uniform_grid

# (overrides, substrings of the message)
BAD = [
    (["algo=vggflow", "algo.eta=t3"], ["algo.eta=t3", "t2, t, const, none"]),
    (["algo=vggflow", "algo.rgrad_clip=p90"], ["algo.rgrad_clip=p90", "batch_quantile, previous_step, const, none"]),
    (["algo=vggflow", "algo.fd_scheme=backward"], ["algo.fd_scheme=backward", "central, forward"]),
    (["algo=vggflow", "algo.consistency_times=between"], ["algo.consistency_times=between", "grid, within_step"]),
    (["algo=vggflow", "algo.learn_value=maybe"], ["algo.learn_value", "maybe"]),
    (["algo=vggflow", "algo.beta=-1"], ["algo.beta must be finite and > 0, got -1"]),
    (["algo=vggflow_pmp", "algo.adjoint=half"], ["algo.adjoint=half", "full, lean"]),
    (["algo=vggflow_pmp", "algo.target=prev"], ["algo.target=prev", "next, same"]),
    (["algo=refl", "algo.objective=exp"], ["algo.objective=exp", "relu, hinge, raw"]),
    (["algo=refl", "algo.truncation=[15]"], ["algo.truncation must be two integers", "[15]"]),
    (["algo=refl", "algo.truncation_grid_steps=twenty"], ["algo.truncation_grid_steps", "twenty"]),
    (["algo=draft", "algo.variant=x"], ["algo.variant=x", "lv, k"]),
    (["algo=draft", "algo.lv_reduce=max"], ["algo.lv_reduce=max", "mean, sum"]),
    (["algo=draft", "algo.n=0"], ["algo.n=0 must be >= 1"]),
    (["algo=adjoint_matching", "algo.train_grid=fine"], ["algo.train_grid=fine", "uniform, model"]),
    (["algo=adjoint_matching", "algo.loss_times.last=most"], ["algo.loss_times.last", "most"]),
    (["algo=adjoint_matching", "algo.h=-1"], ["algo.h must be > 0"]),
    (["train.steps=0"], ["train.steps must be >= 1, got 0"]),
    (["train.steps=1.5"], ["train.steps", "1.5"]),
    (["train.batch_size=6", "train.grad_accum=4"], ["train.batch_size (6) must be a positive multiple", "(4)"]),
    (["train.lr=0"], ["train.lr must be finite and > 0"]),
    (["train.progress=sometimes"], ["train.progress", "sometimes"]),
    (["sampler.grid=cosine"], ["sampler.grid=cosine", "uniform, sd3"]),
    (["sampler.steps=many"], ["sampler.steps", "many"]),
    (["eval.fid_reference=both"], ["eval.fid_reference=both", "independent, paired"]),
    (["eval.final_samples=0"], ["eval.final_samples must be >= 1"]),
    (["device=gpu"], ["device=gpu", "auto, cpu, cuda"]),
    (["threads=all"], ["threads", "all"]),
    (["model=gmm", "model.weights=[1,2,3]"], ["model.weights has 3 entries but model.means has 2 components"]),
    (["model=sd3", "model.decoder=vqgan"], ["model.decoder=vqgan", "taesd3, vae"]),
    (["model=digits", "model.lora_rank=eight"], ["model.lora_rank", "eight"]),
    (["reward=aesthetic", "reward.dtype=fp64"], ["reward.dtype=fp64", "fp16", "fp32"]),
    (["reward=hpsv2", "reward.version=v3"], ["reward.version must be one of", "v3"]),
    (["reward=linear", "reward.scale=big"], ["reward.scale", "big"]),
]


@pytest.mark.parametrize("overrides,needles", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_values_are_refused_naming_key_value_and_choices(overrides, needles):
    with pytest.raises(ConfigProblem) as err:
        check_overrides(overrides, CONF_DIR)
    msg = str(err.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg


@pytest.mark.parametrize("overrides,needles", [BAD[0], BAD[8], BAD[14], BAD[19], BAD[22], BAD[24], BAD[26]],
                         ids=["algo", "objective", "am", "train", "sampler", "eval", "device"])
def test_the_command_line_exits_2_with_the_message_and_no_traceback(tmp_path, overrides, needles):
    res = align_run(*overrides, f"run_dir={tmp_path / 'r'}", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("align: ") and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and all(n in res.stderr for n in needles), res.stderr
    assert not (tmp_path / "r").exists()


def test_composed_sections_are_typed_and_choices_compare_as_strings():
    cfg = compose_config(["algo=vggflow", "algo.eta=t"])
    assert OmegaConf.get_type(cfg.algo).__name__ == "VGGFlowConfig"
    assert OmegaConf.get_type(cfg.train).__name__ == "TrainConfig"
    assert cfg.algo.eta == "t" and cfg.device == "auto" and cfg.eval.fid_reference == "paired"


def test_a_saved_config_is_typed_and_checked_again():
    cfg = compose_config(["algo=draft"], run_dir="r")
    saved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))   # as config.yaml
    typed = typed_config(saved)
    assert OmegaConf.get_type(typed.algo).__name__ == "DRaFTConfig" and typed.algo.variant == "lv"
    saved.algo.variant = "x"
    with pytest.raises(ValueError, match="lv, k"):
        typed_config(saved)
    saved.algo.variant, saved.train.steps = "k", 0
    with pytest.raises(ValueError, match="train.steps must be >= 1"):
        typed_config(saved)


def test_a_resumed_runs_config_is_checked_before_any_work(tmp_path):
    cfg = compose_config(["algo=vggflow_pmp"], run_dir=str(tmp_path))
    saved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    saved.algo.adjoint = "half"
    OmegaConf.save(saved, tmp_path / "config.yaml")
    with pytest.raises(ConfigProblem, match=r"resume=.*algo.adjoint=half is not a valid choice.*full, lean"):
        check_overrides([f"resume={tmp_path}"], CONF_DIR)


def test_a_config_saved_before_the_typed_configs_is_typed_again():
    cfg = compose_config(["algo=vggflow"], run_dir="r")
    saved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    saved.pop("default_reward")
    saved["model"].update(vggflow_beta=10.0, vggflow_alpha=10.0, am_beta=10.0, default_reward="digits_thickness",
                          train_steps=60, batch_size=8, eval_every=20, eval_samples=160, fid_reference="paired")
    saved["reward"]["domain"] = "digits"
    typed = typed_config(saved)
    assert "vggflow_beta" not in typed.model and typed.algo.beta == 10.0 and typed.train.steps == 60


def test_a_vggflow_run_saved_before_the_space_time_difference_resumes_with_its_own_scheme():
    """algo.fd_terms did not exist: such a run differenced ∂_t g and J_g·d separately, so typing its config.yaml
    again (resume) gives ``separate``, a re-run with today's defaults is a different run, and another algorithm's
    config is not given the key."""
    from align.core.run_dir import flat_config

    cfg = compose_config(["algo=vggflow", "algo.fd_scheme=central"], run_dir="r")
    saved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    saved["algo"].pop("fd_terms")
    assert typed_config(saved).algo.fd_terms == "separate"
    today = OmegaConf.to_container(compose_config(["algo=vggflow"], run_dir="r"), resolve=True, enum_to_str=True)
    assert flat_config(saved)["algo.fd_terms"] == "separate" != flat_config(today)["algo.fd_terms"]
    draft = OmegaConf.to_container(compose_config(["algo=draft"], run_dir="r"), resolve=True, enum_to_str=True)
    assert "fd_terms" not in typed_config(draft).algo


# name, class, config dataclass, the settings without a default (ints where the field is a float)
ALGORITHMS_AND_CONFIGS = [
    ("vggflow", VGGFlow, VGGFlowConfig, {"lr": 1e-3, "beta": 2, "alpha": 10}),
    ("vggflow_authors", VGGFlowAuthors, VGGFlowConfig, {"lr": 1e-3, "beta": 2, "alpha": 10}),
    ("vggflow_pmp", VGGFlowPMP, VGGFlowPMPConfig, {"lr": 1e-3, "beta": 2}),
    ("adjoint_matching", AdjointMatching, AdjointMatchingConfig, {"lr": 1e-3, "beta": 2}),
    ("flow_grpo", FlowGRPO, FlowGRPOConfig, {"lr": 1e-3, "beta": 2}),
    ("diffusion_nft", DiffusionNFT, DiffusionNFTConfig, {"lr": 1e-3}),
    ("refl", ReFL, ReFLConfig, {"lr": 1e-3}),
    ("draft", DRaFT, DRaFTConfig, {"lr": 1e-3}),
]


def test_the_table_below_covers_every_built_in_algorithm():
    built_in = {n for n in ALGORITHMS.names() if ALGORITHMS.get(n).__module__.startswith("algorithms.")}
    assert built_in == {name for name, *_ in ALGORITHMS_AND_CONFIGS}


@pytest.mark.parametrize("name, cls, schema, required", ALGORITHMS_AND_CONFIGS,
                         ids=[a[0] for a in ALGORITHMS_AND_CONFIGS])
def test_an_algorithm_holds_an_instance_of_its_config_dataclass(name, cls, schema, required):
    """From an untyped DictConfig (a resumed run's config.yaml section) and from a dict: the dataclass, its fields of
    their declared types (an int given for a float field is a float); a key it has no field for is refused."""
    model = GaussianMixtureFlow(weights=[0.5, 0.5], means=[[-1.5, 0.0], [1.5, 0.0]],
                                covs=[[[0.25, 0.0], [0.0, 0.25]]] * 2, hidden=8, depth=1)
    reward, ts = LinearReward([1.0, 0.0]), uniform_grid(10)
    given = {"name": name, **required}
    for cfg in (OmegaConf.create(given), dict(given)):
        algo = cls(cfg, model, reward, ts)
        assert type(algo.cfg) is schema
        assert algo.cfg.name == name and algo.cfg.lr == 1e-3
        for key, value in required.items():
            assert getattr(algo.cfg, key) == value and type(getattr(algo.cfg, key)) is float, key
    with pytest.raises(TypeError, match=rf"algo={name}: unknown setting\(s\) betta; valid keys: .*\blr\b"):
        cls({**given, "betta": 1.0}, model, reward, ts)


# config dataclass, settings that pass, the rule, its argument, settings on top that break it, the message
RULES = [
    (VGGFlowConfig, {"lr": 1e-3, "beta": 1.0, "alpha": 1.0}, "validate_steps", 5, {"subsample_bins": 6},
     "algo.subsample_bins must be in \\[1, sampler.steps=5\\], got 6"),
    (VGGFlowConfig, {"lr": 1e-3, "beta": 1.0, "alpha": 1.0}, "validate", None, {"fd_step": "raw"},
     "algo.fd_step=raw .* needs algo.fd_terms=separate"),
    (VGGFlowPMPConfig, {"lr": 1e-3, "beta": 1.0}, "validate_steps", 5, {"subsample_bins": 6},
     "algo.subsample_bins must be in"),
    (FlowGRPOConfig, {"lr": 1e-3, "beta": 0.04}, "validate_batch", 8, {"group_size": 3}, "algo.group_size=3 must divide"),
    (FlowGRPOConfig, {"lr": 1e-3, "beta": 0.04, "train_grid": "model", "train_steps": None}, "validate_steps", 20,
     {"train_steps": 10}, "algo.train_grid=model trains on the sampler's 20 steps"),
    (DiffusionNFTConfig, {"lr": 1e-3, "n_times": 5, "collect_grid": "uniform", "collect_steps": 5}, "validate_steps",
     20, {"n_times": 6}, "algo.n_times=6 distinct grid times"),
    (DiffusionNFTConfig, {"lr": 1e-3}, "validate_batch", 8, {"group_size": 3}, "algo.group_size=3 must divide"),
    (ReFLConfig, {"lr": 1e-3}, "validate_steps", 20, {"truncation": [15]}, "algo.truncation must be two integers"),
    (DRaFTConfig, {"lr": 1e-3}, "validate", None, {"n": 0}, "algo.n=0 must be >= 1"),
    (AdjointMatchingConfig, {"lr": 1e-3, "beta": 1.0}, "validate", None, {"h": -1.0}, "algo.h must be > 0"),
]


@pytest.mark.parametrize("schema, good, rule, arg, bad, match", RULES,
                         ids=[f"{r[0].__name__}.{r[2]}" for r in RULES])
def test_an_algorithms_rules_hold_on_its_dictconfig_and_on_its_dataclass(schema, good, rule, arg, bad, match):
    """The refusal pass calls them on the typed DictConfig; the dataclass instance is what the algorithm holds."""
    def run(cfg):
        return getattr(schema, rule)(cfg) if arg is None else getattr(schema, rule)(cfg, arg)

    for settings, ok in ((good, True), ({**good, **bad}, False)):
        node = OmegaConf.merge(OmegaConf.structured(schema), settings)
        for cfg in (node, OmegaConf.to_object(node)):
            if ok:
                run(cfg)
            else:
                with pytest.raises(ValueError, match=match):
                    run(cfg)


def test_a_hand_built_config_instance_is_checked_and_typed():
    """A dataclass instance built by hand goes through the same checks as a dict (validate() and OmegaConf's
    types); only the instances the build takes from the refusal pass's checked config are taken as they are."""
    ts = uniform_grid(4)
    model = GaussianMixtureFlow()
    with pytest.raises(ValueError, match="algo.beta must be finite and > 0, got -1.0"):
        VGGFlow(VGGFlowConfig(lr=1e-3, beta=-1.0, alpha=1.0), model, LinearReward([1.0, 0.0]), ts)
    algo = VGGFlow(VGGFlowConfig(lr=1e-3, beta=2, alpha=1), model, LinearReward([1.0, 0.0]), ts)
    assert type(algo.cfg.beta) is float and algo.cfg.beta == 2.0       # the int a user wrote, typed as the field
    with pytest.raises(ValueError, match="model.weights must all be positive"):
        GaussianMixtureFlow(GMMConfig(weights=[-1.0, 2.0]))
