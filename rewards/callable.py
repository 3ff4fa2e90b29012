"""``reward=callable reward.target=...``: any Python callable as the reward, without a registry entry.

``reward.target`` names the object, in one of three forms:

* ``pkg.module:function`` — an importable module and an attribute of it (dotted for a nested one: ``Class.method``);
* ``pkg.module.function`` — Hydra's dotted form (``hydra.utils.instantiate``'s ``_target_``);
* ``path/to/file.py:function`` — a user file, imported by path (relative to the working directory).

A class is instantiated, and a function given ``reward.kwargs`` is called, through ``hydra.utils.instantiate``
(``_target_`` the object, ``reward.kwargs`` its arguments, nested ``_target_`` entries instantiated too); the
result is the reward. The reward is called as ``r(images, prompts)`` with a copy of the model's decoded samples
(the domain's ``decode``: pixels in [0, 1] for digits and SD3, the points themselves for gmm) and of the prompt
list, so that a callable writing into its input changes nothing else, and returns a tensor [B] or a sequence of B
numbers; anything else stops with a message naming the target (``RewardError``). A non-finite value is returned as
it is: the trainer's preflight refuses it before any work, training skips the update it came in
(``train.max_bad_steps`` in a row stop the run, naming the target), and evaluation reports it
(``eval/reward_nonfinite``).

A user callable is a black box unless ``reward.differentiable=true`` says otherwise (then its output must hold a
graph to the images when they require one); ``reward.domain`` (default ``any``) names the model it scores.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from align.core.interfaces import Reward, RewardError
from align.core.registry import MODELS, register_reward

FORMS = "pkg.module:function, pkg.module.function or path/to/file.py:function"


@dataclass
class CallableConfig:
    """``reward=callable``: a Python callable ``r(images, prompts) -> [B]`` named by ``target``."""
    name: str = "callable"
    target: Optional[str] = None     # pkg.module:function | pkg.module.function | path/to/file.py:function
    domain: str = "any"              # the model it scores: any, or a model's name (gmm, digits, sd3)
    differentiable: bool = False     # true: its output is differentiable in the images (a black box otherwise)
    # arguments of a class or factory named by target (instantiated with them; the instance is the reward), a
    # mapping: 'reward.kwargs={scale: 2.0}' (typed Any, not a dict, so that a command-line mapping replaces it)
    kwargs: Any = None

    def validate(self) -> None:
        if self.kwargs is not None and not isinstance(self.kwargs, (dict, DictConfig)):
            raise ValueError(f"reward.kwargs must be a mapping of arguments, e.g. 'reward.kwargs={{scale: 2.0}}', "
                             f"got {self.kwargs!r}")
        obj = locate(self.target)
        kwargs = dict(self.kwargs or {})
        if inspect.isclass(obj) or kwargs:
            try:
                signature = inspect.signature(obj)
            except (TypeError, ValueError):       # no signature to read (a builtin): instantiating will tell
                signature = None
            if signature is not None:
                try:
                    signature.bind(**kwargs)
                except TypeError as err:
                    raise ValueError(f"reward.target={self.target} cannot be called with reward.kwargs={kwargs}: "
                                     f"{err}") from None
        if self.domain != "any" and self.domain not in MODELS.names():
            raise ValueError(f"reward.domain={self.domain} is not a model; valid choices: any, "
                             f"{', '.join(MODELS.names())}")


def locate(target: str | None) -> Any:
    """The object ``target`` names; ValueError saying which form it was read as and what is missing."""
    if not target or not str(target).strip():
        raise ValueError(f"reward=callable needs reward.target ({FORMS}), e.g. reward.target=my_module:my_reward")
    target = str(target).strip()
    where, sep, attr = target.rpartition(":")
    if sep and where.endswith(".py"):
        return _attribute(_import_file(target, where), attr, target, f"the file {where}")
    if sep:
        return _attribute(_import_module(target, where), attr, target, f"the module {where}")
    if target.endswith(".py"):
        raise ValueError(f"reward.target={target}: a file needs the name of its callable: {target}:<function>")
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):          # the longest importable prefix is the module
        module = ".".join(parts[:i])
        try:
            found = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name is not None and not module.startswith(err.name):
                raise ValueError(f"reward.target={target}: importing {module} failed: {err}") from None
            continue
        except Exception as err:
            raise ValueError(f"reward.target={target}: importing {module} failed: {type(err).__name__}: "
                             f"{err}") from None
        return _attribute(found, ".".join(parts[i:]), target, f"the module {module}")
    raise ValueError(f"reward.target={target}: no module {parts[0]!r} can be imported (module not found; is it "
                     f"on PYTHONPATH?); the forms are {FORMS}")


def _import_module(target: str, module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        reason = "module not found" if err.name and module.startswith(err.name) else str(err)
        raise ValueError(f"reward.target={target}: cannot import {module} ({reason}; is it on PYTHONPATH?)") from None
    except Exception as err:
        raise ValueError(f"reward.target={target}: importing {module} failed: {type(err).__name__}: "
                         f"{err}") from None


def _import_file(target: str, path: str) -> Any:
    """The user file at ``path``, imported once per absolute path (a module named after its path's hash)."""
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(full):
        raise ValueError(f"reward.target={target}: no such file {path!r} (looked for {full})")
    name = f"align_user_reward_{os.path.splitext(os.path.basename(full))[0]}_" \
           f"{hashlib.sha1(full.encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, full)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise ValueError(f"reward.target={target}: importing the file {path} failed: {type(err).__name__}: "
                         f"{err}") from None
    return module


def _attribute(module: Any, attr: str, target: str, where: str) -> Any:
    obj = module
    for part in attr.split("."):
        if not part or not hasattr(obj, part):
            public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise ValueError(f"reward.target={target}: {where} has no attribute {attr!r}; its callables: "
                             f"{', '.join(public) or 'none'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward.target={target}: {attr} is a {type(obj).__name__}, not a callable")
    return obj


def make_callable(target: str, kwargs: dict[str, Any] | None) -> Callable[..., Any]:
    """The reward callable: the object itself, or (a class, or kwargs given) what instantiating it returns."""
    from hydra.utils import instantiate

    obj = locate(target)
    kwargs = dict(kwargs or {})
    if not (inspect.isclass(obj) or kwargs):
        return obj
    try:
        made = instantiate({"_target_": obj, "_convert_": "all", **kwargs})
    except Exception as err:
        cause = err.__cause__ or err
        raise ValueError(f"reward.target={target}: instantiating it with reward.kwargs={kwargs} failed: "
                         f"{type(cause).__name__}: {cause}") from None
    if not callable(made):
        raise ValueError(f"reward.target={target}: instantiating it returned a {type(made).__name__}, which is not "
                         "callable as r(images, prompts)")
    return made


@register_reward("callable", config=CallableConfig)
class CallableReward(Reward):
    """r(images, prompts) = the user's callable on a copy of its input, its output checked: shape [B], fp32 (fp64
    kept); non-finite values are passed on (the trainer and the evaluator deal with them)."""

    name, domain, differentiable = "callable", "any", False

    def __init__(self, target: str, domain: str = "any", differentiable: bool = False,
                 kwargs: dict[str, Any] | None = None, **_: Any):
        super().__init__()
        self.target, self.domain, self.differentiable = str(target), str(domain), bool(differentiable)
        fn = make_callable(self.target, kwargs)
        if isinstance(fn, nn.Module):
            self.module = fn            # a submodule: moved with .to(device), put in eval mode by the trainer
        else:
            object.__setattr__(self, "fn", fn)

    @classmethod
    def is_differentiable(cls, cfg: Any) -> bool:
        return bool(cfg.get("differentiable", False))

    @classmethod
    def domain_of(cls, cfg: Any) -> str:
        return str(cfg.get("domain", "any"))

    def description(self) -> str:
        return f"reward=callable (reward.target={self.target})"

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        fn = self.module if "module" in self._modules else self.fn
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.differentiable):
            # copies: the samples (a trajectory's x_1 itself where decode is the identity) and the prompts are the
            # run's; clone() keeps the graph to the images for a differentiable callable
            out = fn(images.clone(), list(prompts))
        return self._checked(out, images)

    def _checked(self, out: Any, images: torch.Tensor) -> torch.Tensor:
        n, what = images.shape[0], self.description()
        if not isinstance(out, torch.Tensor):
            try:
                out = torch.as_tensor(out, dtype=torch.float64 if images.dtype == torch.float64 else torch.float32)
            except (TypeError, ValueError, RuntimeError):
                raise RewardError(f"{what} returned a {type(out).__name__} for {n} images; it must return a tensor "
                                  f"[{n}] or a sequence of {n} numbers") from None
        if out.shape != (n,):
            raise RewardError(f"{what} returned shape {tuple(out.shape)} for {n} images; it must return a tensor "
                              f"[{n}] or a sequence of {n} numbers")
        if not out.is_floating_point():
            out = out.float()
        if self.differentiable and images.requires_grad and torch.is_grad_enabled() and not out.requires_grad:
            raise RewardError(f"{what} has reward.differentiable=true but its output holds no gradient to the "
                              "images; return a differentiable tensor, or set reward.differentiable=false")
        if not self.differentiable:
            out = out.detach()
        return out.to(images.device, torch.promote_types(out.dtype, torch.float32))
