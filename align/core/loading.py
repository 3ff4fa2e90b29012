"""Loading pretrained components with the installed libraries: dtype names, the dtype keyword each library reads,
and errors that tell a library mismatch from a missing or corrupt file."""
from __future__ import annotations

import importlib
from typing import Any, Callable

import torch

from align.core.weights import WeightSpec

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
# Errors that say our call and the installed library disagree (an unknown keyword, a missing attribute), not that
# a file is missing or corrupt: reported as such, never as missing weights.
LIBRARY_ERRORS = (TypeError, AttributeError, ImportError, NameError, NotImplementedError)
# ``from_pretrained``'s dtype keyword: ``dtype`` from diffusers 0.40 / transformers 4.56 on, ``torch_dtype``
# before (older diffusers ignore ``dtype`` and load fp32, twice the memory; older transformers raise).
DTYPE_KEYWORD_SINCE = {"diffusers": (0, 40), "transformers": (4, 56)}


class LibraryLoadError(RuntimeError):
    """A component that failed to load inside its library for a reason other than its files (typically a
    library version our call does not fit); the message names the component and the installed versions."""


def library_versions() -> str:
    out = []
    for name in ("torch", "diffusers", "transformers", "peft"):
        try:
            out.append(f"{name} {importlib.import_module(name).__version__}")
        except Exception:  # noqa: BLE001 - a version report must not fail
            out.append(f"{name} ?")
    return ", ".join(out)


def dtype_kwargs(library: str, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``{"dtype": dtype}`` or ``{"torch_dtype": dtype}``, whichever the installed ``library`` reads."""
    from packaging.version import Version

    release = Version(importlib.import_module(library).__version__).release
    return {"dtype" if release >= DTYPE_KEYWORD_SINCE[library] else "torch_dtype": dtype}


def load_component(what: str, spec: WeightSpec, fn: Callable[[], Any]) -> Any:
    """``fn()``, the ``from_pretrained`` of ``what``: a library mismatch raises LibraryLoadError, anything else
    (missing, corrupt, incompatible files) ``spec``'s WeightsError naming the component."""
    try:
        return fn()
    except LIBRARY_ERRORS as err:
        raise LibraryLoadError(f"{spec.config_key}: loading the {what} failed inside its library, not for a "
                               f"missing or corrupt file ({type(err).__name__}: {err}). Installed: "
                               f"{library_versions()}; align needs the versions in its pyproject.toml "
                               "(`pip install -e .` installs them)") from err
    except Exception as err:  # noqa: BLE001 - missing / corrupt / incompatible files: say which component
        raise spec.error(f"could not load the {what} ({type(err).__name__}: {err})") from err
