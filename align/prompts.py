"""Prompt sets: the domain's default, a named set (``prompts=animals|hpdv2|pickapic``, see
``align/prompt_sets``), or ``prompts=file:<path>`` (one prompt per line)."""
from __future__ import annotations

import os

from align.interfaces import FlowModel


def load_prompts(spec: str | None, model: FlowModel) -> list[str]:
    if spec is None:
        return list(model.default_prompts())
    spec = str(spec)
    from align.prompt_sets import NAMED_SETS, load_named_set

    if spec in NAMED_SETS:
        return load_named_set(spec)
    if spec.startswith("file:"):
        path = os.path.expanduser(spec[len("file:"):])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prompts={spec}: no such file {path!r}")
        with open(path, encoding="utf-8") as fh:
            prompts = [line.strip() for line in fh if line.strip()]
        if not prompts:
            raise ValueError(f"prompts={spec}: the file {path!r} has no prompts (one per line expected)")
        return prompts
    raise ValueError(f"prompts={spec!r}: expected null (the domain's prompts), "
                     f"{' | '.join(NAMED_SETS)} or file:<path>")
