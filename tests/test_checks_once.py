"""One ``python -m align.run`` checks its config once: each check of the refusal pass (align/setup/checks.py) and
each typed config's ``validate()`` runs once, the prompts are loaded once and the held-out rewards' entries parsed
once, however many places build from the config afterwards (the job's ``build_trainer``, the algorithm, the
Trainer)."""
import collections
import functools
import importlib
import sys

from hydra._internal.config_loader_impl import ConfigLoaderImpl

from align.core.registry import ALGORITHMS, MODELS, REWARDS
from align.core.schema import EvalConfig, RootConfig, TrainConfig
from align.setup.registration import prepare_compose
from helpers.cli import align_run

# the refusal pass's checks, and what they call that the build used to repeat
CHECKS = ("check_values", "check_domain", "check_reward_gradient", "check_eval_rewards", "check_prompts",
          "check_run_dir", "check_groups")
PROBES = ("load_prompts", "parse_entries", "is_differentiable")
OURS = ("align", "algorithms", "rewards")


def _count_function(monkeypatch, counts: collections.Counter, module: str, name: str) -> None:
    """Count calls of ``module.name`` through every module of ours that holds it (``from x import name`` copies)."""
    original = getattr(sys.modules.get(module), name, None)
    if original is None:      # no such check here: it counts 0
        return

    @functools.wraps(original)
    def counted(*args, **kwargs):
        counts[name] += 1
        return original(*args, **kwargs)

    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").split(".")[0] in OURS and getattr(mod, name, None) is original:
            monkeypatch.setattr(mod, name, counted)


def _count_method(monkeypatch, counts: collections.Counter, cls: type, name: str) -> None:
    original = cls.__dict__[name]

    def counted(*args, **kwargs):
        counts[f"{cls.__name__}.{name}"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(cls, name, counted)


def test_one_run_runs_each_check_once(tmp_path, monkeypatch):
    prepare_compose()
    for module in ("align.setup.assemble", "align.setup.overrides", "align.run"):   # loaded before counting
        importlib.import_module(module)

    counts = collections.Counter()
    for name in CHECKS:
        _count_function(monkeypatch, counts, "align.setup.checks", name)
    _count_function(monkeypatch, counts, "align.setup.prompts", "load_prompts")
    _count_function(monkeypatch, counts, "align.core.reward_mix", "parse_entries")
    _count_function(monkeypatch, counts, "align.core.reward_mix", "is_differentiable")
    configs = (RootConfig, TrainConfig, EvalConfig, ALGORITHMS.config("flow_grpo"), MODELS.config("gmm"),
               REWARDS.config("linear"))
    validators = [(cls, m) for cls in configs for m in ("validate", "validate_steps", "validate_batch")
                  if m in cls.__dict__]
    for cls, m in validators:
        _count_method(monkeypatch, counts, cls, m)
    _count_method(monkeypatch, counts, ConfigLoaderImpl, "load_configuration")   # every Hydra compose
    monkeypatch.setattr(sys.modules["align.setup.overrides"], "_GROUPS_CONFIGS", {})   # nothing cached earlier

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\n")
    res = align_run("model=gmm", "reward=linear", "algo=flow_grpo", "train.steps=1", "train.batch_size=4",
                    "algo.group_size=2", "eval.every=0", "eval.n_samples=8", "eval.group_size=4",
                    "eval.final_samples=4", "eval.rewards=[{name: quadratic}]", f"prompts=file:{prompts}",
                    "train.progress=false", f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr

    once = {**{name: 1 for name in CHECKS + PROBES}, **{f"{cls.__name__}.{m}": 1 for cls, m in validators}}
    assert {k: counts[k] for k in once} == once
    from align.train.trainer import Trainer

    assert not hasattr(Trainer, "_check_groups")      # the groups are the pass's, not the trainer's
    # Hydra composes 4 times: before Hydra starts the job, the config of the group choices alone (where an unknown
    # key is looked up, to list the valid ones) and the run's config, which the pass checks; then hydra.main's two
    # (its run mode, and the job's config) — the job builds from that one, as a launcher in a fresh process does
    assert counts["ConfigLoaderImpl.load_configuration"] == 4
