"""The CPU kernels ``python -m experiments.reproduce`` runs a study with: PyTorch's AVX2 set on x86-64 (the same
numbers on a CPU with AVX2 and on one with AVX-512), a choice the user made kept, nothing pinned elsewhere; a
process started with that environment does run AVX2 kernels (torch's own report); a study invocation runs its runs
with it and records it."""
import os
import platform
from unittest import mock

import pytest
import torch

from experiments.reproduce import kernels

needs_avx2 = pytest.mark.skipif(platform.machine().lower() not in kernels.X86_64
                                or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                                reason="the AVX2 kernel set needs an x86-64 CPU with AVX2")


def test_the_avx2_set_is_pinned_on_x86_64_only_and_a_users_setting_is_kept():
    assert kernels.pinned({}, machine="x86_64") == {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2",
                                                    "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    assert kernels.pinned({}, machine="AMD64")["ATEN_CPU_CAPABILITY"] == "avx2"
    own = kernels.pinned({"ATEN_CPU_CAPABILITY": "default", "PATH": "/bin"}, machine="x86_64")
    assert own["ATEN_CPU_CAPABILITY"] == "default" and own["PATH"] == "/bin" and own["DNNL_MAX_CPU_ISA"] == "AVX2"
    assert kernels.pinned({"PATH": "/bin"}, machine="aarch64") == {"PATH": "/bin"}
    assert kernels.stated(own) == "ATEN_CPU_CAPABILITY=default DNNL_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2"
    assert kernels.stated({"PATH": "/bin"}) == ""


@needs_avx2
def test_a_process_started_with_the_pinned_environment_runs_the_avx2_kernels():
    bare = {k: v for k, v in os.environ.items() if k not in kernels.PINNED}
    assert kernels.kernel_set(kernels.pinned(bare)) == "AVX2"
    assert kernels.kernel_set(bare) == torch.backends.cpu.get_cpu_capability()


@needs_avx2
def test_a_study_invocation_runs_pinned_and_records_the_kernels(tmp_path):
    from experiments.reproduce import study as study_mod

    (tmp_path / "first.yaml").write_text("name: first\ncommon: [model=gmm, reward=linear, train.steps=1]\n"
                                         "grids:\n  - algo: [refl]\n    seed: [0]\n")
    toy = study_mod.Study("toy", (study_mod.Section("first", "first.yaml"),), docs="d", page="p.md",
                          root=str(tmp_path))
    plan = study_mod.make_plan(toy, str(tmp_path / "runs"))
    bare = {k: v for k, v in os.environ.items() if k not in kernels.PINNED}
    with mock.patch.dict(os.environ, bare, clear=True), \
            mock.patch.object(study_mod, "run_main_job", return_value=("", False)):
        entry = study_mod.run_study(plan, jobs=1)
        seen = {k: os.environ.get(k) for k in kernels.PINNED}      # what the runs inherited
    assert seen == kernels.PINNED
    assert (entry["cpu_kernels"], entry["ran"], entry["failed"]) == ("AVX2", 1, 0)
    assert entry["kernel_env"] == "ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2"
    assert study_mod.read_log(plan.runs_root) == [entry]
