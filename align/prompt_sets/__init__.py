"""Named prompt sets: ``prompts=animals | hpdv2 | pickapic`` (paper §5.1).

* ``animals`` (``animals.txt``): our own list of 48 common animal names, in the spirit of DDPO's
  "simple animals" prompts that the paper uses with the aesthetic reward.
* ``hpdv2`` (``hpdv2.txt``): a **stand-in** of 24 photo and painting prompts written for this project in
  the style of HPDv2's photo + painting benchmark prompts (used with HPSv2). Not the real set.
* ``pickapic`` (``pickapic.txt``): a **stand-in** of 24 prompts written in the style of Pick-a-Pic user
  captions (used with PickScore). Not the real set.

The real HPDv2 / Pick-a-Pic prompts cannot be fetched here. Point an environment variable at a local copy
and the named set loads it instead of the stand-in:

    ALIGN_HPDV2_PROMPTS=<path>      ALIGN_PICKAPIC_PROMPTS=<path>

``<path>`` is a text file (one prompt per line), a ``.json`` file (a list of strings, or of objects with a
``prompt`` / ``caption`` field, e.g. HPDv2's ``benchmark/photo.json`` + ``paintings.json`` concatenated), a
``.jsonl`` file of such objects, or a directory written by the HF ``datasets`` library's
``save_to_disk`` (column ``prompt`` or ``caption``; needs ``pip install datasets``).
"""
from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
NAMED_SETS: dict[str, tuple[str, str | None]] = {    # name → (built-in file, env var of the real set)
    "animals": ("animals.txt", None),
    "hpdv2": ("hpdv2.txt", "ALIGN_HPDV2_PROMPTS"),
    "pickapic": ("pickapic.txt", "ALIGN_PICKAPIC_PROMPTS"),
}
TEXT_FIELDS = ("prompt", "caption", "text")


def builtin_path(name: str) -> str:
    return os.path.join(HERE, NAMED_SETS[name][0])


def read_prompt_file(path: str, what: str) -> list[str]:
    """Prompts of a .txt (one per line), .json or .jsonl file; a clear error if missing or empty."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no such file {path!r}")
    with open(path, encoding="utf-8") as fh:
        if path.endswith(".jsonl"):
            prompts = [_text(json.loads(line), what) for line in fh if line.strip()]
        elif path.endswith(".json"):
            data = json.load(fh)
            if not isinstance(data, list):
                raise ValueError(f"{what}: {path!r} must hold a JSON list of prompts")
            prompts = [_text(item, what) for item in data]
        else:
            prompts = [line.strip() for line in fh]
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise ValueError(f"{what}: the file {path!r} has no prompts (one per line expected)")
    return prompts


def _text(item, what: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in TEXT_FIELDS:
            if isinstance(item.get(key), str):
                return item[key]
    raise ValueError(f"{what}: cannot read a prompt from {item!r} (expected a string or a "
                     f"{'/'.join(TEXT_FIELDS)} field)")


def _read_dataset_dir(path: str, what: str) -> list[str]:
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"{what}: {path!r} is a directory, read as a HF `datasets` save_to_disk copy, but the "
                          "`datasets` package is not installed (pip install datasets), or export the prompts "
                          "to a text file, one per line") from err
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        ds = datasets.concatenate_datasets(list(ds.values()))
    for key in TEXT_FIELDS:
        if key in ds.column_names:
            prompts = [p.strip() for p in ds[key] if isinstance(p, str) and p.strip()]
            if prompts:
                return prompts
    raise ValueError(f"{what}: the dataset at {path!r} has no non-empty {'/'.join(TEXT_FIELDS)} column "
                     f"(columns: {ds.column_names})")


def load_named_set(name: str) -> list[str]:
    """The named set: the local real set if its environment variable is set, else the built-in list."""
    if name not in NAMED_SETS:
        raise ValueError(f"prompts={name!r}: unknown prompt set; valid choices: {', '.join(NAMED_SETS)}")
    _, env_var = NAMED_SETS[name]
    path = os.environ.get(env_var) if env_var else None
    if path:
        path = os.path.expanduser(path)
        what = f"prompts={name} ({env_var}={path})"
        if os.path.isdir(path):
            return _read_dataset_dir(path, what)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what}: no such file or directory; point {env_var} at a local copy of the "
                                    f"{name} prompts (text / json / jsonl file or a datasets save_to_disk "
                                    f"directory), or unset it to use the built-in stand-in list")
        return read_prompt_file(path, what)
    return read_prompt_file(builtin_path(name), f"prompts={name}")
