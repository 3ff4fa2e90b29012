"""Prompt sets: the domain's default, a named set (``prompts=animals|hpdv2|pickapic``, see
``align/prompt_sets``), or ``prompts=file:<path>`` (one prompt per line), checked against the model."""
from __future__ import annotations

import os

from align.core.interfaces import FlowModel


def load_prompts(spec: str | None, model: FlowModel | type[FlowModel]) -> list[str]:
    """The prompts ``prompts=spec`` names; ``spec=None``: ``model.default_prompts()`` (an instance's). Other sets
    go through ``model.check_prompts`` (a class will do), so a prompt the model cannot condition on is a
    ValueError naming ``prompts=`` before any work."""
    if spec is None:
        return list(model.default_prompts())
    prompts = _read(str(spec))
    try:
        model.check_prompts(prompts)
    except ValueError as err:
        raise ValueError(f"prompts={spec}: {err}") from None
    return prompts


def _read(spec: str) -> list[str]:
    from align.prompt_sets import NAMED_SETS, load_named_set

    if spec in NAMED_SETS:
        return load_named_set(spec)
    if spec.startswith("file:"):
        path = os.path.expanduser(spec[len("file:"):])
        if os.path.isdir(path):
            raise ValueError(f"prompts={spec} is a directory, not a text file; give a file in it, e.g. "
                             f"prompts=file:{os.path.join(path, '<name>.txt')} (one prompt per line)")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prompts={spec}: no such file {path!r}")
        binary = ValueError(f"prompts={spec}: the file {path!r} is not a text file (UTF-8, one prompt per line)")
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except UnicodeDecodeError:
            raise binary from None
        if "\0" in text:
            raise binary
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompts={spec}: the file {path!r} has no prompts (one per line expected)")
        return prompts
    raise ValueError(f"prompts={spec!r}: expected null (the domain's prompts), "
                     f"{' | '.join(NAMED_SETS)} or file:<path>")
