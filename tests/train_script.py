"""Train a tiny Llama for the resume tests: ``python train_script.py OUT_DIR [--kill-at N] [--optimizer NAME]``.

With ``--kill-at N`` the process SIGKILLs itself right after step N, as a crash or a power cut
would: no cleanup code runs. The losses of a finished run go to OUT_DIR/losses.json.
"""

import argparse
import dataclasses
import json
import os
import signal
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # tests/ for tiny_models, and this checkout's lorakit
from tiny_models import tiny_llama as tiny_base  # noqa: E402

from lorakit.train import TrainConfig, train  # noqa: E402


def tiny_llama(seed: int = 0, dropout: float = 0.1):
    """tests/tiny_models.py's tiny Llama with attention dropout: randomness the checkpoint's RNG state must restore."""
    model = tiny_base(seed=seed)
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = dropout
    return model


def tiny_blocks(n: int = 24, seq_len: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    start = torch.randint(0, 64, (n, 1), generator=g)
    return (start + torch.arange(seq_len)) % 64  # (N, T): a learnable counting pattern


# page_budget_bytes: two pages of 4 KiB, so the paged optimizers really page the tiny model's state
CONFIG = TrainConfig(steps=10, lr=3e-3, batch_size=4, grad_accum=2, warmup_steps=2, checkpoint_every=2,
                     page_budget_bytes=8192, progress=False)
UNSTOPPED = dataclasses.replace(CONFIG, checkpoint_every=0)  # the same run without checkpoints

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--optimizer", default="adamw")
    args = parser.parse_args()

    def on_step(result):
        if args.kill_at is not None and result.step == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    config = dataclasses.replace(CONFIG, optimizer=args.optimizer)
    result = train(tiny_llama(), tiny_blocks(), tiny_blocks(8), config, checkpoint_dir=args.out, on_step=on_step)
    with open(os.path.join(args.out, "losses.json"), "w") as f:
        json.dump({"losses": result.losses, "evals": result.evals, "resumed_at": result.resumed_at}, f)
