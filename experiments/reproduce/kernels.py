"""The CPU kernels a study computes with.

PyTorch picks its CPU kernels by the instruction set it finds (ATen's vectorised kernels, oneDNN's convolutions and
matmuls, MKL): on a CPU with AVX-512 they add in another order than on one with AVX2, and 60 updates carry the
last-bit difference into the third digit of the printed reward (the main job: 3.669 with AVX2 kernels, 3.675 with
AVX-512 ones). A study pins the AVX2 set on x86-64 (nearly every x86-64 server and desktop CPU since 2015 has
AVX2), so that its runs give the same numbers on any CPU with AVX2 or AVX-512; a variable the user set is kept.
What the runs used is recorded in study.json and stated on the page."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
X86_64 = ("x86_64", "amd64")


def pinned(environ: dict[str, str] | None = None, machine: str | None = None) -> dict[str, str]:
    """``environ`` (default: this process's) with the AVX2 kernel set on x86-64 wherever it does not choose already."""
    env = dict(os.environ if environ is None else environ)
    if (machine or platform.machine()).lower() in X86_64:
        for key, value in PINNED.items():
            env.setdefault(key, value)
    return env


def kernel_set(env: dict[str, str]) -> str:
    """The ATen CPU capability a new process started with ``env`` runs with (e.g. ``AVX2``, ``AVX512``, ``SVE256``)."""
    proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                          env=env, capture_output=True, text=True, check=False)
    return proc.stdout.strip() or "unknown"


def stated(env: dict[str, str]) -> str:
    """The variables of ``PINNED`` that ``env`` sets, as a shell prefix (empty: none)."""
    return " ".join(f"{k}={env[k]}" for k in PINNED if k in env)
