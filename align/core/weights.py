"""Weight files and directories: where each comes from, found one way, reported in one message format.

A ``WeightSpec`` says what a component needs (a file, or a directory with required files), the config key that
points to it, the environment variable read when the key is unset, a shipped default and where to get it (a URL,
a Hugging Face hub repo, or a command). ``resolve`` looks in that order: the key's value (for ``hub_ids``
specs a hub id is fetched with ``snapshot_download``, only the required files), the environment variable, the
default, then ``hub_repo``. Hub weights behave as in diffusers: downloaded into the Hugging Face cache on first
use when online, read from the cache otherwise; with HF_HUB_OFFLINE=1 only the cache is read (nothing is
requested from the network). Every failure is a ``WeightsError`` of the form

    <what>: <what went wrong>. Get <filename>: <where>; then set the config key `<key>=<path>`
    [or the environment variable <ENV>=<path>] [(...the Hugging Face cache...)] [; or <alternative>].

Heavy imports (huggingface_hub) are local so that importing this module is cheap.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Any

WEIGHT_GLOBS = ("*.safetensors", "*.bin")


class WeightsError(FileNotFoundError):
    """A missing or unreadable weight file; the message names it, where to get it and the key that points to it."""


@dataclass(frozen=True)
class WeightSpec:
    """Where one weight file (or ``is_dir``: a directory) comes from and how the user gets it.

    ``hub_files``: files looked up in the HF cache of ``hub_repo`` (first found wins; for ``is_dir`` the folder
    holding it). ``required`` (directories): groups of alternative glob patterns, one of each group must match.
    ``hub_ids``: the key's value may be a hub id ``owner/name``, fetched with ``snapshot_download``.
    """

    what: str
    filename: str
    config_key: str
    env_var: str | None = None
    hub_repo: str | None = None
    hub_files: tuple[str, ...] = ()
    url: str | None = None
    get: str | None = None
    default: str | None = None
    is_dir: bool = False
    required: tuple[tuple[str, ...], ...] = ()
    hub_ids: bool = False
    value_hint: str = "<path>"
    alternative: str | None = None

    def how_to_get(self) -> str:
        where = [f"download {self.url}"] if self.url else []
        if self.hub_repo:
            files = f" ({', '.join(self.hub_files)})" if self.hub_files else ""
            where.append(f"`huggingface-cli download {self.hub_repo}`{files}")
        if self.get:
            where.append(self.get)
        point = f"the config key `{self.config_key}={self.value_hint}`"
        if self.env_var:
            point += f" or the environment variable {self.env_var}={self.value_hint}"
        text = f"Get {self.filename}: {' or '.join(where) or 'ask its authors'}; then set {point}"
        if self.hub_repo:
            text += (" (or leave it unset: align downloads it into the Hugging Face cache on first use when online, "
                     "and reads that cache when HF_HUB_OFFLINE=1)")
        if self.alternative:
            text += f"; or {self.alternative}"
        return text + "."

    def error(self, problem: str) -> WeightsError:
        return WeightsError(f"{self.what}: {problem}. {self.how_to_get()}")


def looks_local(spec: str) -> bool:
    """A filesystem path rather than a hub id ``owner/name``."""
    return (os.path.isabs(spec) or spec.startswith((".", "~")) or os.path.exists(spec)
            or spec.count("/") != 1 or os.sep == "\\" and "\\" in spec)


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE asks for the Hugging Face cache only (read now, as huggingface_hub reads it at import)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE")
    return constants.HF_HUB_OFFLINE if flag is None else flag.strip().lower() in ("1", "on", "yes", "true")


def resolve(spec: WeightSpec, value: str | None = None, cache_dir: str | None = None) -> str:
    """The local path of ``spec``'s weights: ``value`` (the config key), else $``env_var``, else ``default``, else
    the HF cache of ``hub_repo``, else (online) its download into that cache. Raises WeightsError when the path
    found does not exist, a directory lacks a required file, or nothing is found."""
    env = (os.environ.get(spec.env_var) or None) if spec.env_var else None
    for label, given in ((spec.config_key, value), (spec.env_var, env)):
        if given:
            given = os.path.expanduser(str(given))
            label = f"{label}={given}"
            path = _snapshot(spec, given, label) if spec.hub_ids and not looks_local(given) else given
            return _checked(spec, path, label)
    if spec.default:
        return _checked(spec, spec.default, f"the default {spec.default}")
    if not spec.hub_repo:
        raise spec.error(f"not found: {_unset(spec)}")
    path = _hub_cached(spec, cache_dir)
    if path:
        return _checked(spec, path, f"the Hugging Face cache's {path}")
    if hub_offline():
        raise spec.error(f"not found: {_unset(spec)}, and the Hugging Face cache has no '{spec.hub_repo}' "
                         "(HF_HUB_OFFLINE=1: not downloaded)")
    path = _hub_download(spec, cache_dir)
    return _checked(spec, path, f"the download of '{spec.hub_repo}' ({path})")


def _unset(spec: WeightSpec) -> str:
    return (f"neither the config key `{spec.config_key}` nor the environment variable {spec.env_var} is set"
            if spec.env_var else f"the config key `{spec.config_key}` is not set")


def _hub_cached(spec: WeightSpec, cache_dir: str | None) -> str | None:
    """``spec``'s file (or, ``is_dir``, the folder holding it) already in the HF cache of ``hub_repo``."""
    for f in spec.hub_files or (spec.filename,):
        found = _hf_cached(spec.hub_repo, f, cache_dir)
        if found:
            return os.path.dirname(found) if spec.is_dir else found
    return None


def _hub_download(spec: WeightSpec, cache_dir: str | None) -> str:
    """``hub_repo``'s files downloaded into the HF cache: a directory spec's required files (one snapshot), else
    the first of ``hub_files`` the repo has. Any failure (no network, gated, unknown file) is a WeightsError."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    try:
        if spec.is_dir:
            patterns = sorted({p for group in spec.required for p in group} | set(spec.hub_files))
            return huggingface_hub.snapshot_download(repo_id=spec.hub_repo, allow_patterns=patterns,
                                                     cache_dir=cache_dir)
        errors = []
        for f in spec.hub_files or (spec.filename,):
            try:
                return huggingface_hub.hf_hub_download(repo_id=spec.hub_repo, filename=f, cache_dir=cache_dir)
            except EntryNotFoundError as err:   # the repo has the other file name
                errors.append(err)
        raise errors[-1]
    except Exception as err:  # noqa: BLE001 - offline, gated, unknown repo: all the same to the user
        raise spec.error(f"not found: {_unset(spec)}, and downloading '{spec.hub_repo}' from the Hugging Face "
                         f"hub failed ({_first_line(err)})") from err


def _checked(spec: WeightSpec, path: str, label: str) -> str:
    if not (os.path.isdir(path) if spec.is_dir else os.path.isfile(path)):
        raise spec.error(f"{label} is not an existing {'directory' if spec.is_dir else 'file'}")
    missing = [" or ".join(group) for group in spec.required
               if not any(glob.glob(os.path.join(path, p)) for p in group)]
    if missing:
        raise spec.error(f"{label} lacks {', '.join(missing)}" + ("" if label.endswith(path) else f" (in {path})"))
    return path


def _snapshot(spec: WeightSpec, repo: str, label: str) -> str:
    """The snapshot of hub repo ``repo``, limited to the folders of ``spec.required``: downloaded (or updated)
    when online, the cached one with HF_HUB_OFFLINE=1."""
    from huggingface_hub import snapshot_download

    folders = {p.rsplit("/", 1)[0] + "/*" if "/" in p else "*" for group in spec.required for p in group}
    try:
        return snapshot_download(repo_id=repo, allow_patterns=["model_index.json", "*.json", *sorted(folders)],
                                 local_files_only=hub_offline())
    except Exception as err:  # noqa: BLE001 - offline, gated, unknown repo: all the same to the user
        if hub_offline():
            raise spec.error(f"{label}: the Hugging Face cache has no snapshot of it (HF_HUB_OFFLINE=1: not "
                             "downloaded)") from err
        raise spec.error(f"{label}: could not get it from the Hugging Face hub or cache "
                         f"({_first_line(err)})") from err


def _hf_cached(repo: str, filename: str, cache_dir: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
    except Exception:  # noqa: BLE001 - a malformed cache is the same as no cache
        return None
    return found if isinstance(found, str) and os.path.isfile(found) else None


def load_tensors(spec: WeightSpec, path: str) -> dict[str, Any]:
    """The tensors of the safetensors file ``path`` (found by ``resolve(spec, ...)``); a file that is not one is
    a WeightsError naming it and the key."""
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ...: the file is unusable either way
        raise spec.error(f"{path} is not a readable safetensors file ({_first_line(err)})") from None


def load_json(spec: WeightSpec, path: str, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON object in ``path`` (a weight file's companion, e.g. its architecture), holding ``keys``; anything
    else is a WeightsError naming the file and the key."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as err:   # ValueError: JSONDecodeError, UnicodeDecodeError
        raise spec.error(f"{path} is not a readable JSON file ({_first_line(err)})") from None
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise spec.error(f"{path} lacks {', '.join(missing)}")
    return data


def load_state(spec: WeightSpec, module: Any, state: dict[str, Any], path: str) -> None:
    """``module.load_state_dict(state)``; tensors that do not fit (missing, unexpected, other shapes) are a
    WeightsError naming ``path`` and the key."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise spec.error(f"{path} does not hold this architecture's tensors ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


@dataclass(frozen=True)
class WeightNeed:
    """One weight a run loads: its spec and the value of the config key that points to it (None: unset)."""

    spec: WeightSpec
    value: str | None

    def resolved(self) -> str:
        """The local path (downloading when online), or a WeightsError naming the file and the way forward."""
        return resolve(self.spec, self.value)
