"""``python -m lorakit.finetune --method qlora --rank 8 --bits 4 --steps N --out DIR``."""

from __future__ import annotations

import argparse
import sys

from lorakit.finetune import BACKENDS, BITS, METHODS, QUANT_TYPES, FinetuneConfig, finetune


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = FinetuneConfig()
    p = argparse.ArgumentParser(prog="python -m lorakit.finetune", description="Fine-tune SmolLM2 with full, LoRA or QLoRA.")
    p.add_argument("--method", default=d.method, help=f"one of {', '.join(METHODS)} (default {d.method})")
    p.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank r (default {d.rank})")
    p.add_argument("--alpha", type=float, default=d.alpha, help=f"LoRA alpha; scaling = alpha / r (default {d.alpha:g})")
    p.add_argument("--bits", type=int, default=d.bits, help=f"QLoRA base-weight bits, one of {BITS} (default {d.bits})")
    p.add_argument("--quant-type", default=d.quant_type, help=f"one of {', '.join(QUANT_TYPES)} (default {d.quant_type})")
    p.add_argument("--blocksize", type=int, default=d.blocksize)
    p.add_argument("--no-double-quant", action="store_true", help="keep the absmax constants in float32")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-4; full: 2e-5)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--eval-blocks", type=int, default=d.eval_blocks)
    p.add_argument("--train-blocks", type=int, default=None, help="cap on training blocks")
    p.add_argument("--corpus", default=d.corpus)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--backend", default=d.backend, help=f"one of {', '.join(BACKENDS)} (default {d.backend})")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the CPU)")
    p.add_argument("--out", required=True, help="output folder for run.json, checkpoints, the adapter and metrics.json")
    p.add_argument("--overwrite", action="store_true", help="replace an output folder that holds a different run")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    config = FinetuneConfig(
        method=a.method, rank=a.rank, alpha=a.alpha, bits=a.bits, quant_type=a.quant_type, blocksize=a.blocksize,
        double_quant=not a.no_double_quant, steps=a.steps, lr=a.lr, batch_size=a.batch_size, grad_accum=a.grad_accum,
        seq_len=a.seq_len, eval_blocks=a.eval_blocks, train_blocks=a.train_blocks, corpus=a.corpus,
        gradient_checkpointing=a.gradient_checkpointing, seed=a.seed, backend=a.backend,
    )
    try:
        result = finetune(config, out=a.out, overwrite=a.overwrite, device=a.device, progress=not a.no_progress)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = result.metrics
    print(f"held-out perplexity before: {m['ppl_before']:.2f}")
    print(f"held-out perplexity after:  {m['ppl_after']:.2f}  ({100 * (m['ppl_after'] / m['ppl_before'] - 1):+.1f}%)")
    print(f"{m['steps']} steps in {m['seconds']:.1f} s; peak RSS {m['peak_rss_mb']:.0f} MB; "
          f"trainable {m['trainable_params']:,} of {m['total_params']:,} parameters")
    if m["interrupted"]:
        print("interrupted: run the same command again to resume from the last checkpoint")
    return 0


if __name__ == "__main__":
    sys.exit(main())
