"""Prompt sets: the domain's default, or ``prompts=file:<path>`` (one prompt per line)."""
from __future__ import annotations

import os

from align.interfaces import FlowModel


def load_prompts(spec: str | None, model: FlowModel) -> list[str]:
    if spec is None:
        return list(model.default_prompts())
    spec = str(spec)
    if spec.startswith("file:"):
        path = os.path.expanduser(spec[len("file:"):])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prompts={spec}: no such file {path!r}")
        with open(path, encoding="utf-8") as fh:
            prompts = [line.strip() for line in fh if line.strip()]
        if not prompts:
            raise ValueError(f"prompts={spec}: the file {path!r} has no prompts (one per line expected)")
        return prompts
    raise ValueError(f"prompts={spec!r}: expected null (the domain's prompts) or file:<path>")
