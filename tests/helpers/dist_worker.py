"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: train on gmm through the Trainer
(DRaFT-K unless extra overrides are given), record the x_0 each process drew, and save them with the final
finetuned parameters. ``ALIGN_TEST_NAN_RANK=r`` makes the first loss of rank r non-finite. Mode ``probe`` also
records the process group's timeout and, for every gradient sync, the all-reduce calls made and each rank's
gradients before and after (rank 1's first parameter has no gradient: it counts as zeros). ``ALIGN_TEST_FP64=1``
trains in float64 (tests/helpers/fp64.py: parameters compared with a one-process run; the overrides must hold
``LINEAR_ADAM``)."""
import os
import sys

import torch
import torch.distributed as dist

from align.setup.assemble import build_trainer
from align.setup.compose import compose_config
from helpers.fp64 import build_linear_fp64_trainer

DRAFT = ["algo=draft", "algo.variant=k", "algo.k=2", "algo.objective=raw"]
BASE = ["model=gmm", "reward=linear", "model.hidden=16", "sampler.steps=6", "train.batch_size=4", "train.lr=1e-2",
        "train.checkpoint_every=1", "eval.every=0", "eval.n_samples=16", "eval.final_samples=8", "train.progress=false",
        "device=cpu"]
OVERRIDES = BASE + DRAFT


def probe(trainer) -> dict:
    """Wrap ``trainer._sync_gradients`` to record what it sends and what it leaves (see the module docstring)."""
    record = {"timeout_s": dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout.total_seconds(),
              "groups": len(trainer.groups), "calls": [], "local": [], "averaged": []}
    sync, all_reduce = trainer._sync_gradients, dist.all_reduce
    params = [p for g in trainer.groups for p in g["params"]]

    def counting(tensor, *args, **kwargs):
        record["calls"][-1].append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    def probed():
        if dist.get_rank() == 1:
            params[0].grad = None
        record["local"].append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params])
        record["calls"].append([])
        dist.all_reduce = counting
        try:
            sync()
        finally:
            dist.all_reduce = all_reduce
        record["averaged"].append([p.grad.clone() for p in params])

    trainer._sync_gradients = probed
    return record


def main(run_dir: str, steps: int, out: str, mode: str, extra: list[str]) -> None:
    torch.set_num_threads(1)
    extra = extra + [f"train.steps={steps}"] + ([f"resume={run_dir}"] if mode == "resume" else [])
    base = BASE if any(o.startswith("algo=") for o in extra) else OVERRIDES
    build = build_linear_fp64_trainer if os.environ.get("ALIGN_TEST_FP64") == "1" else build_trainer
    trainer = build(compose_config(base + extra, run_dir), run_dir)
    rank = trainer.accelerator.process_index
    drawn = []
    sample_noise = trainer.model.sample_noise

    def recording(n, generator):
        x = sample_noise(n, generator)
        drawn.append(x.clone())
        return x

    trainer.model.sample_noise = recording
    if os.environ.get("ALIGN_TEST_NAN_RANK") == str(rank):
        loss, calls = trainer.algo.loss, []

        def poisoned(traj, generator):
            value, logs = loss(traj, generator)
            calls.append(1)
            return (value * float("nan") if len(calls) == 1 else value), logs

        trainer.algo.loss = poisoned
    record = probe(trainer) if mode == "probe" else {}
    start = {"start_params": {k: v.clone() for k, v in trainer.model.finetune_state_dict().items()},
             "start_algo": {k: v.clone() for k, v in trainer.algo.state_dict().items()}}
    trainer.train()
    torch.save({"x0": drawn, "world": trainer.accelerator.num_processes, "skipped": trainer.skipped,
                "params": trainer.model.finetune_state_dict(), "algo": trainer.algo.state_dict(),
                "step": trainer.step, "group_alive_after_train": dist.is_initialized(), **start, **record},
               f"{out}.rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:])
