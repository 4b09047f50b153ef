"""Train a tiny Llama for the resume tests: ``python train_script.py OUT_DIR [--kill-at N]``.

With ``--kill-at N`` the process SIGKILLs itself right after step N, as a crash or a power cut
would: no cleanup code runs. The losses of a finished run go to OUT_DIR/losses.json.
"""

import json
import os
import signal
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.train import TrainConfig, train


def tiny_llama(seed: int = 0, dropout: float = 0.1) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attention_dropout=dropout,  # some randomness that the checkpoint's RNG state must restore
    )
    return LlamaForCausalLM(config)


def tiny_blocks(n: int = 24, seq_len: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    start = torch.randint(0, 64, (n, 1), generator=g)
    return (start + torch.arange(seq_len)) % 64  # (N, T): a learnable counting pattern


CONFIG = TrainConfig(steps=10, lr=3e-3, batch_size=4, grad_accum=2, warmup_steps=2, checkpoint_every=2, progress=False)

if __name__ == "__main__":
    out = sys.argv[1]
    kill_at = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[2] == "--kill-at" else None

    def on_step(result):
        if kill_at is not None and result.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    result = train(tiny_llama(), tiny_blocks(), tiny_blocks(8), CONFIG, checkpoint_dir=out, on_step=on_step)
    with open(os.path.join(out, "losses.json"), "w") as f:
        json.dump({"losses": result.losses, "evals": result.evals}, f)
