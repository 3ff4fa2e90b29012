"""The per-(model, reward, algorithm) hyperparameters in one table: β, α and the learning rate, filled in
automatically.

The algorithm presets read their defaults from here (``align/conf/algo/*.yaml``)::

    beta: ${align_paper:beta}      # vggflow, vggflow_pmp, adjoint_matching, flow_grpo
    alpha: ${align_paper:alpha}    # vggflow
    lr: ${align_paper:lr}          # every algorithm; train.lr defaults to ${algo.lr}

The resolver looks up the run's ``model.name``, ``reward.name`` and ``algo.name`` in TABLE (``lookup``). Being an
interpolation, the value is replaced by anything set explicitly: a command-line ``algo.beta=…`` /
``train.lr=…``, a sweep's or Hydra multirun's override, or a resumed run's saved (resolved) config.yaml.
``describe`` gives the line ``align.run`` prints at start (which values came from the table, from where): it
resolves β and lr and reports what the resolver handed out.
(The other per-domain defaults, budgets and the default reward, are the domain's preset, align/conf/preset/.)

TABLE's rows, keyed ``(model, reward, algorithm)`` with ``*`` for every model or reward, give each setting's value
and its source. Sources:
* ``("sd3", reward, algo)``, one row per reward: the VGG-Flow paper's Table 1 settings, as collected in
  ``../shared/reference/algorithms.md`` §1.8 (β = 1/λ of VGG-Flow: aesthetic 5e4, HPSv2 3e7, PickScore 5e5;
  α = 1e4; lr: VGG-Flow 5e-4, VGG-Flow-PMP 1e-4 on aesthetic and 5e-5 on HPSv2 / PickScore, ReFL, DRaFT and
  Adjoint Matching 1e-4) and §3 (Adjoint Matching's reward multiplier: aesthetic 5e3, HPSv2 3e5, PickScore 1e4).
  VGG-Flow-PMP's β is VGG-Flow's (inferred: the paper lists only its lr). docs/sd3.md, "The paper's Table 1".
* ``(model, "*", algo)``: the domain's β and α, the same for every reward of the domain (digits and gmm: tuned for
  rewards of order one, not from the paper; SD3, for a reward you add: the aesthetic column's; Flow-GRPO's β on
  every domain).
* ``("*", "*", algo)``: the algorithm's paper lr (§1.8), for every (model, reward) without a row of its own.
``lookup`` takes the first of these rows that holds the setting: the model × reward row, the algorithm's lr, the
domain's row. A model that borrows (BORROWS: FLUX from SD3) takes its own rows, then the lender's, and says so;
``vggflow_authors`` reads ``vggflow``'s rows (ROW_OF). A setting no row holds stops the run with a message asking
for it (e.g. ``algo.beta=``).
"""
from __future__ import annotations

import os
from contextvars import ContextVar
from typing import NamedTuple

from omegaconf import DictConfig, OmegaConf

from align.conf import CONF_DIR

RESOLVER = "align_paper"
SOURCE = "align/setup/paper_settings.py"


class Setting(NamedTuple):
    value: float
    source: str         # where the value comes from, as the start-up line says


def _rows(model: str, reward: str, source: str, **algos: dict[str, float]) -> dict:
    return {(model, reward, algo): {k: Setting(v, source) for k, v in settings.items()}
            for algo, settings in algos.items()}


PAPER = f"{SOURCE}: paper Table 1, reference §1.8/§3"
# (model, reward, algorithm) -> setting -> Setting
TABLE: dict[tuple[str, str, str], dict[str, Setting]] = {
    # The paper's Table 1 on SD3 (reference §1.8, §3). Every reward: VGG-Flow lr 5e-4 and α 1e4; ReFL, DRaFT and
    # Adjoint Matching lr 1e-4.
    **_rows("sd3", "aesthetic", PAPER, vggflow={"beta": 5.0e4, "alpha": 1.0e4, "lr": 5.0e-4},
            vggflow_pmp={"beta": 5.0e4, "lr": 1.0e-4}, adjoint_matching={"beta": 5.0e3, "lr": 1.0e-4},
            refl={"lr": 1.0e-4}, draft={"lr": 1.0e-4}),
    **_rows("sd3", "hpsv2", PAPER, vggflow={"beta": 3.0e7, "alpha": 1.0e4, "lr": 5.0e-4},
            vggflow_pmp={"beta": 3.0e7, "lr": 5.0e-5}, adjoint_matching={"beta": 3.0e5, "lr": 1.0e-4},
            refl={"lr": 1.0e-4}, draft={"lr": 1.0e-4}),
    **_rows("sd3", "pickscore", PAPER, vggflow={"beta": 5.0e5, "alpha": 1.0e4, "lr": 5.0e-4},
            vggflow_pmp={"beta": 5.0e5, "lr": 5.0e-5}, adjoint_matching={"beta": 1.0e4, "lr": 1.0e-4},
            refl={"lr": 1.0e-4}, draft={"lr": 1.0e-4}),
    # Every reward of a domain. digits, gmm: β of O(1)-rewards; α = 10, as g is O(0.1–1) here, not O(1e-4) on SD3.
    # Flow-GRPO's β is its KL coefficient: 0.04, the Flow-GRPO paper's (GenEval/OCR) value on every domain
    # (published with the code's KL, algo.kl=code; the default algo.kl=paper weighs it by 1/Δt more: docs/flow_grpo.md)
    **_rows("digits", "*", "the digits domain's value", vggflow={"beta": 10.0, "alpha": 10.0},
            vggflow_pmp={"beta": 10.0}, adjoint_matching={"beta": 10.0}, flow_grpo={"beta": 0.04}),
    **_rows("gmm", "*", "the gmm domain's value", vggflow={"beta": 1.0, "alpha": 10.0},
            vggflow_pmp={"beta": 1.0}, adjoint_matching={"beta": 1.0}, flow_grpo={"beta": 0.04}),
    # SD3, a reward without a Table 1 row: the aesthetic column's values (the run's start-up line says so)
    **_rows("sd3", "*", "the sd3 domain's value", vggflow={"beta": 5.0e4, "alpha": 1.0e4},
            vggflow_pmp={"beta": 5.0e4}, adjoint_matching={"beta": 5.0e3}, flow_grpo={"beta": 0.04}),
    # FLUX borrows SD3's rows (BORROWS) except Flow-GRPO's β: 0 in flow_grpo's FLUX configs (pickscore_flux:
    # train.beta = 0)
    **_rows("flux", "*", "the flux domain's value", flow_grpo={"beta": 0.0}),
    # The algorithm's paper learning rate (§1.8). Flow-GRPO (Liu et al. 2025, SD3.5-M, LoRA) and DiffusionNFT
    # (Zheng et al. 2025, SD3.5-M, LoRA): 3e-4.
    **_rows("*", "*", "the algorithm's paper value, reference §1.8", vggflow={"lr": 5.0e-4},
            vggflow_pmp={"lr": 1.0e-4}, adjoint_matching={"lr": 1.0e-4}, refl={"lr": 1.0e-4},
            draft={"lr": 1.0e-4}, flow_grpo={"lr": 3.0e-4}, diffusion_nft={"lr": 3.0e-4}),
}
# A model that borrows another's rows, reported as borrowed: FLUX.1 (no paper tuned β on it) starts from SD3's
# Table 1 row of the same reward (β is relative to the reward's scale, the same reward's).
BORROWS: dict[str, str] = {"flux": "sd3"}
# Presets that read another algorithm's rows: VGG-Flow as its authors' code runs it takes VGG-Flow's β and α.
ROW_OF: dict[str, str] = {"vggflow_authors": "vggflow"}
# Where each setting is used in the config (what ``describe`` reports; α is not: it is fixed per domain).
CONFIG_KEYS = {"beta": "algo.beta", "lr": "train.lr"}


class MissingSetting(ValueError):
    """No table entry for this (model, reward, algorithm, setting): the user has to give the value."""


def _names(root) -> tuple[str, str, str]:
    return tuple(str(OmegaConf.select(root, f"{g}.name", default="?")) for g in ("model", "reward", "algo"))


def lookup(model: str, reward: str, algo: str, setting: str) -> Setting:
    """One setting's value and source; raises MissingSetting."""
    algo = ROW_OF.get(algo, algo)
    lender = BORROWS.get(model)
    # the model × reward row, the algorithm's paper lr, the domain's row; a borrower: its own rows, then the lender's
    keys = [(model, reward, algo), (model, "*", algo)] if lender else \
        [(model, reward, algo), ("*", "*", algo), (model, "*", algo)]
    for key in keys:
        if setting in (row := TABLE.get(key, {})):
            return row[setting]
    if lender:
        value, source = lookup(lender, reward, algo, setting)
        return Setting(value, f"{source}, {lender}'s row borrowed for {model} (untuned there)")
    raise MissingSetting(_missing(model, reward, algo, setting))


def _rewards_with_rows(model: str) -> list[str]:
    return list(dict.fromkeys(r for m, r, _ in TABLE if m == model and r != "*"))


def _missing(model: str, reward: str, algo: str, setting: str) -> str:
    key = "algo." + setting if setting != "lr" else "train.lr"
    rows = ", ".join(_rewards_with_rows(model))
    has = f" ({SOURCE} has {model} × {rows})" if rows else ""
    return (f"no paper setting of {key} for model={model} × reward={reward} × algo={algo}{has}; "
            f"give it explicitly, e.g. {key}=<value>")


# While ``describe`` resolves a key: the (setting, Setting) pairs the resolver handed out.
_handed_out: ContextVar[list[tuple[str, Setting]] | None] = ContextVar("align_paper_handed_out", default=None)


def resolve(setting: str, *, _root_) -> float:
    """The ``${align_paper:<setting>}`` resolver (registered by ``align.setup.registration``)."""
    found = lookup(*_names(_root_), setting)
    if (record := _handed_out.get()) is not None:
        record.append((setting, found))
    return float(found.value)


def find_missing(err: BaseException) -> MissingSetting | None:
    """The MissingSetting behind an OmegaConf resolution error, if that is what it is."""
    while err is not None:
        if isinstance(err, MissingSetting):
            return err
        err = err.__cause__ or err.__context__
    return None


# ---- what a run took from the table ------------------------------------------------------------------------
def fmt(x: float) -> str:
    """3e7, 5e-4, 10, 0.5: short, and valid as a command-line value."""
    x = float(x)
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-2):
        mantissa, exp = f"{x:.6e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"
    return f"{x:g}"


def resolved_from_table(cfg: DictConfig) -> list[tuple[str, float, str]]:
    """``(config key, value, where from)`` for each of CONFIG_KEYS whose value the resolver handed out."""
    out = []
    for key in CONFIG_KEYS.values():
        token = _handed_out.set([])
        try:
            value = OmegaConf.select(cfg, key, default=None)      # resolves, through ${algo.lr} and the like
            handed = _handed_out.get()
        finally:
            _handed_out.reset(token)
        if handed:
            out.append((key, float(value), handed[0][1].source))
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
    nothing came from the table (everything given, or a resumed run's saved config: the resolver hands out nothing)."""
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
    if reward in _rewards_with_rows(model):
        return f"align: paper settings for {model} × {reward} × {algo}: {parts}{tail}"
    if model in BORROWS:
        return f"align: settings for {model} × {reward} × {algo} borrowed from {BORROWS[model]}: {parts}{tail}"
    return f"align: domain defaults for {model} × {reward} × {algo} ({SOURCE}, {model} row): {parts}{tail}"
