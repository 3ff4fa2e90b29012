"""The per-(model, reward, algorithm) hyperparameters in one table: β, α and the learning rate, filled in
automatically.

The algorithm presets read their defaults from here (``align/conf/algo/*.yaml``)::

    beta: ${align_paper:beta}      # vggflow, vggflow_pmp, adjoint_matching
    alpha: ${align_paper:alpha}    # vggflow
    lr: ${align_paper:lr}          # every algorithm; train.lr defaults to ${algo.lr}

The resolver looks up the run's ``model.name``, ``reward.name`` and ``algo.name`` below. Being an
interpolation, the value is replaced by anything set explicitly: a command-line ``algo.beta=…`` /
``train.lr=…``, a sweep's or Hydra multirun's override, or a resumed run's saved (resolved) config.yaml.
``describe`` gives the line ``align.run`` prints at start (which values came from the table, from where).
(The other per-domain defaults, budgets and the default reward, are the domain's preset, align/conf/preset/.)

Sources.
* TABLE, SD3 (``model=sd3``), one row per reward: the VGG-Flow paper's Table 1 settings, as collected in
  ``../shared/reference/algorithms.md`` §1.8 (β = 1/λ of VGG-Flow: aesthetic 5e4, HPSv2 3e7, PickScore 5e5;
  α = 1e4; lr: VGG-Flow 5e-4, VGG-Flow-PMP 1e-4 on aesthetic and 5e-5 on HPSv2 / PickScore, ReFL, DRaFT and
  Adjoint Matching 1e-4) and §3 (Adjoint Matching's reward multiplier: aesthetic 5e3, HPSv2 3e5, PickScore 1e4).
  VGG-Flow-PMP's β is VGG-Flow's (inferred: the paper lists only its lr). docs/sd3.md, "The paper's Table 1".
* Every other (model, reward): β and α from DOMAIN, the same for every reward of the domain (digits and gmm:
  tuned for rewards of order one, not from the paper; SD3, for a reward you add: the aesthetic column's), and the
  algorithm's paper lr (LR, §1.8). A model without a DOMAIN row stops the run with a message asking for
  ``algo.beta=``.
"""
from __future__ import annotations

import os
import re

from omegaconf import DictConfig, OmegaConf

from align.conf import CONF_DIR

RESOLVER = "align_paper"
SOURCE = "align/setup/paper_settings.py"

# The paper's Table 1 on SD3 (reference §1.8, §3), one row per reward:
#   reward: (β of VGG-Flow and VGG-Flow-PMP, lr of VGG-Flow-PMP, β of Adjoint Matching)
# Every reward: VGG-Flow lr 5e-4 and α 1e4; ReFL, DRaFT and Adjoint Matching lr 1e-4.
SD3_TABLE_1: dict[str, tuple[float, float, float]] = {
    "aesthetic": (5.0e4, 1.0e-4, 5.0e3),
    "hpsv2":     (3.0e7, 5.0e-5, 3.0e5),
    "pickscore": (5.0e5, 5.0e-5, 1.0e4),
}
# (model, reward) -> algorithm -> setting -> value
TABLE: dict[tuple[str, str], dict[str, dict[str, float]]] = {
    ("sd3", reward): {"vggflow": {"beta": beta, "alpha": 1.0e4, "lr": 5.0e-4},
                      "vggflow_pmp": {"beta": beta, "lr": lr_pmp},
                      "adjoint_matching": {"beta": beta_am, "lr": 1.0e-4},
                      "refl": {"lr": 1.0e-4}, "draft": {"lr": 1.0e-4}}
    for reward, (beta, lr_pmp, beta_am) in SD3_TABLE_1.items()
}
# model -> algorithm -> setting -> value, for every reward of the domain without a TABLE row.
DOMAIN: dict[str, dict[str, dict[str, float]]] = {
    # β of O(1)-rewards on this domain; α = 10, as g is O(0.1–1) here, not O(1e-4) as on SD3
    # Flow-GRPO's β is its KL coefficient: 0.04, the Flow-GRPO paper's (GenEval/OCR) value on every domain
    # (published with the code's KL, algo.kl=code; the default algo.kl=paper weighs it by 1/Δt more: docs/flow_grpo.md)
    "digits": {"vggflow": {"beta": 10.0, "alpha": 10.0}, "vggflow_pmp": {"beta": 10.0},
               "adjoint_matching": {"beta": 10.0}, "flow_grpo": {"beta": 0.04}},
    "gmm":    {"vggflow": {"beta": 1.0, "alpha": 10.0}, "vggflow_pmp": {"beta": 1.0},
               "adjoint_matching": {"beta": 1.0}, "flow_grpo": {"beta": 0.04}},
    # the aesthetic column's values (the run's start-up line says so)
    "sd3":    {"vggflow": {"beta": 5.0e4, "alpha": 1.0e4}, "vggflow_pmp": {"beta": 5.0e4},
               "adjoint_matching": {"beta": 5.0e3}, "flow_grpo": {"beta": 0.04}},
}
# A model with no rows of its own takes another's, reported as borrowed: FLUX.1 (no paper tuned β on it) starts
# from SD3's Table 1 row of the same reward (β is relative to the reward's scale, the same reward's), except
# Flow-GRPO's β, 0 in flow_grpo's FLUX configs (pickscore_flux: train.beta = 0).
BORROWS: dict[str, str] = {"flux": "sd3"}
OWN: dict[str, dict[str, dict[str, float]]] = {"flux": {"flow_grpo": {"beta": 0.0}}}
# algorithm -> its paper learning rate (§1.8), for every (model, reward) without a TABLE row.
# Flow-GRPO (Liu et al. 2025, SD3.5-M, LoRA) and DiffusionNFT (Zheng et al. 2025, SD3.5-M, LoRA): 3e-4.
LR: dict[str, float] = {"vggflow": 5.0e-4, "vggflow_pmp": 1.0e-4, "adjoint_matching": 1.0e-4, "refl": 1.0e-4,
                        "draft": 1.0e-4, "flow_grpo": 3.0e-4, "diffusion_nft": 3.0e-4}
# Presets that read another algorithm's row: VGG-Flow as its authors' code runs it takes VGG-Flow's β and α.
ROW_OF: dict[str, str] = {"vggflow_authors": "vggflow"}
# Where each setting is used in the config (what ``describe`` reports; α is not: it is fixed per domain).
CONFIG_KEYS = {"beta": "algo.beta", "lr": "train.lr"}


class MissingSetting(ValueError):
    """No table entry for this (model, reward, algorithm, setting): the user has to give the value."""


def _names(root) -> tuple[str, str, str]:
    return tuple(str(OmegaConf.select(root, f"{g}.name", default="?")) for g in ("model", "reward", "algo"))


def entry(model: str, reward: str, algo: str, setting: str) -> tuple[float, str]:
    """``(value, where it comes from)`` for one setting; raises MissingSetting."""
    algo = ROW_OF.get(algo, algo)
    own = OWN.get(model, {}).get(algo, {})
    if setting in own:
        return own[setting], f"the {model} domain's value"
    if model in BORROWS:
        value, where = entry(BORROWS[model], reward, algo, setting)
        return value, f"{where}, {BORROWS[model]}'s row borrowed for {model} (untuned there)"
    cell = TABLE.get((model, reward), {}).get(algo, {})
    if setting in cell:
        return cell[setting], f"{SOURCE}: paper Table 1, reference §1.8/§3"
    if setting == "lr" and algo in LR:
        return LR[algo], "the algorithm's paper value, reference §1.8"
    cell = DOMAIN.get(model, {}).get(algo, {})
    if setting in cell:
        return cell[setting], f"the {model} domain's value"
    raise MissingSetting(_missing(model, reward, algo, setting))


def _missing(model: str, reward: str, algo: str, setting: str) -> str:
    key = "algo." + setting if setting != "lr" else "train.lr"
    rows = ", ".join(r for m, r in TABLE if m == model)
    has = f" ({SOURCE} has {model} × {rows})" if rows else ""
    return (f"no paper setting of {key} for model={model} × reward={reward} × algo={algo}{has}; "
            f"give it explicitly, e.g. {key}=<value>")


def resolve(setting: str, *, _root_) -> float:
    """The ``${align_paper:<setting>}`` resolver (registered by ``align.setup.registration``)."""
    return float(entry(*_names(_root_), setting)[0])


def find_missing(err: BaseException) -> MissingSetting | None:
    """The MissingSetting behind an OmegaConf resolution error, if that is what it is."""
    while err is not None:
        if isinstance(err, MissingSetting):
            return err
        err = err.__cause__ or err.__context__
    return None


# ---- what a run took from the table ------------------------------------------------------------------------
_PLAIN = re.compile(r"^\$\{([A-Za-z_][\w.]*)\}$")
_TABLE = re.compile(r"^\$\{" + RESOLVER + r":\s*(\w+)\s*\}$")


def _raw(container: dict, path: str):
    node = container
    for p in path.split("."):
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def _table_setting(container: dict, path: str) -> str | None:
    """The setting a key reads from the table (following plain ``${a.b}`` links), or None if it is given."""
    for _ in range(10):
        raw = _raw(container, path)
        if not isinstance(raw, str):
            return None
        if m := _TABLE.match(raw):
            return m.group(1)
        if m := _PLAIN.match(raw):
            path = m.group(1)
            continue
        return None
    return None


def fmt(x: float) -> str:
    """3e7, 5e-4, 10, 0.5: short, and valid as a command-line value."""
    x = float(x)
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-2):
        mantissa, exp = f"{x:.6e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"
    return f"{x:g}"


def resolved_from_table(cfg: DictConfig) -> list[tuple[str, float, str]]:
    """``(config key, value, where from)`` for each of CONFIG_KEYS whose value comes from the table."""
    container = OmegaConf.to_container(cfg, resolve=False)
    model, reward, algo = _names(cfg)
    out = []
    for key in CONFIG_KEYS.values():
        setting = _table_setting(container, key)
        if setting is None:
            continue
        _, where = entry(model, reward, algo, setting)
        out.append((key, float(OmegaConf.select(cfg, key)), where))
    return out


def _preset_literals(algo: str) -> dict[str, float]:
    """The values an algorithm preset (align/conf/algo/<algo>.yaml) writes itself rather than from the table, by
    config key (its ``lr`` is train.lr's default)."""
    path = os.path.join(CONF_DIR, "algo", f"{algo}.yaml")
    if not os.path.isfile(path):
        return {}
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    keys = {"lr": "train.lr", "beta": "algo.beta"}
    return {keys[k]: float(v) for k, v in raw.items() if k in keys and isinstance(v, (int, float))}


def describe(cfg: DictConfig) -> str | None:
    """The line ``align.run`` prints at start, e.g. ``align: paper settings for sd3 × hpsv2 × vggflow:
    algo.beta=3e7, train.lr=5e-4 (align/setup/paper_settings.py: paper Table 1, reference §1.8/§3)``; None when
    nothing came from the table (everything given, or a resumed run's saved config)."""
    found = resolved_from_table(cfg)
    if not found:
        return None
    model, reward, algo = _names(cfg)
    by_where: dict[str, list[str]] = {}
    for key, value, where in found:
        by_where.setdefault(where, []).append(f"{key}={fmt(value)}")
    parts = ", ".join(f"{', '.join(keys)} ({where})" for where, keys in by_where.items())
    given = [k for k in CONFIG_KEYS.values() if k not in {f[0] for f in found}
             and OmegaConf.select(cfg, k, default=None) is not None]
    preset = _preset_literals(algo)
    by_preset = [k for k in given if preset.get(k) == OmegaConf.select(cfg, k)]
    given = [k for k in given if k not in by_preset]
    tail = "".join(f"; {label}: " + ", ".join(f"{k}={fmt(OmegaConf.select(cfg, k))}" for k in keys)
                   for label, keys in ((f"the {algo} preset's", by_preset), ("set explicitly", given)) if keys)
    if (model, reward) in TABLE:
        return f"align: paper settings for {model} × {reward} × {algo}: {parts}{tail}"
    if model in BORROWS:
        return f"align: settings for {model} × {reward} × {algo} borrowed from {BORROWS[model]}: {parts}{tail}"
    return f"align: domain defaults for {model} × {reward} × {algo} ({SOURCE}, {model} row): {parts}{tail}"
