"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: train DRaFT-K on gmm through the
Trainer, record the x_0 each process drew, and save them with the final finetuned parameters."""
import sys

import torch

from align.config import compose_config
from align.trainer import Trainer

OVERRIDES = ["model=gmm", "reward=linear", "algo=draft", "algo.variant=k", "algo.k=2", "algo.objective=raw",
             "model.hidden=16", "sampler.steps=6", "train.batch_size=4", "train.lr=1e-2", "train.checkpoint_every=1",
             "eval.every=0", "eval.n_samples=16", "eval.final_samples=8", "train.progress=false", "device=cpu"]


def main(run_dir: str, steps: int, out: str, resume: bool) -> None:
    torch.set_num_threads(1)
    extra = [f"train.steps={steps}"] + ([f"resume={run_dir}"] if resume else [])
    trainer = Trainer(compose_config(OVERRIDES + extra, run_dir), run_dir)
    drawn = []
    sample_noise = trainer.model.sample_noise

    def recording(n, generator):
        x = sample_noise(n, generator)
        drawn.append(x.clone())
        return x

    trainer.model.sample_noise = recording
    trainer.train()
    rank = trainer.accelerator.process_index
    torch.save({"x0": drawn, "world": trainer.accelerator.num_processes,
                "params": trainer.model.finetune_state_dict(), "step": trainer.step}, f"{out}.rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "resume")
