"""lorakit's QLoRA training step over peft + bitsandbytes' on the same SmolLM2 batch (target: at most 1.0).

One step is forward, backward and an AdamW step over the LoRA parameters, with the fine-tune command's
default settings (NF4, double quantization, blocksize 64, LoRA r=8 on the seven projections, batch 4 x 128
tokens of Shakespeare). Both sides are built by ``lorakit.finetune.build_model`` (``backend="lorakit"``
and ``backend="hf"``), in the same dtype, from the same cached checkpoint. The two steps are timed
interleaved (ours, theirs, ours, ...), so that a slower minute on a shared machine slows both sides;
the script prints each side's median and their ratio. No assertions on time.

Each dtype is measured twice: with glibc's allocator as it starts (``default``), then as the fine-tune
command sets it (``finetune``: ``lorakit.memory.return_freed_memory``, so that freed tensors leave resident
memory at once; every large tensor is then a fresh memory mapping, on both sides). The second is what a
learner's ``python -m lorakit.finetune`` run does; glibc cannot be put back, so it comes second.

Run: ``python benchmarks/bench_qlora.py [--dtype float32 bfloat16] [--allocator default finetune]``
``[--repeats 11] [--profile]``
"""

from __future__ import annotations

import argparse
import warnings

import torch

from lorakit.data import split_documents, tokenize_blocks
from lorakit.finetune import FinetuneConfig, build_model
from lorakit.memory import return_freed_memory
from lorakit.timing import interleaved_latency


def make_step(model: torch.nn.Module, batch: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    model.train()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--allocator", nargs="+", default=["default", "finetune"], choices=["default", "finetune"])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--profile", action="store_true", help="print where lorakit's step spends its time")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size} x {args.seq_len}, "
        f"median of {args.repeats} interleaved steps after one warm-up each"
    )
    print(f"{'allocator':>9} {'dtype':>9} {'lorakit s':>10} {'peft+bnb s':>11} {'ratio':>6}")
    for allocator in args.allocator:
        if allocator == "finetune":
            return_freed_memory()
        for name in args.dtype:
            measure(name, allocator, args)


def measure(name: str, allocator: str, args) -> None:
    dtype = getattr(torch, name)
    torch.manual_seed(0)
    ours, tokenizer = build_model(FinetuneConfig(backend="lorakit"), "cpu", dtype)
    torch.manual_seed(0)
    theirs, _ = build_model(FinetuneConfig(backend="hf"), "cpu", dtype)
    train_docs, _ = split_documents("shakespeare", seed=0)
    batch = tokenize_blocks(tokenizer, train_docs[:3], args.seq_len, max_blocks=args.batch_size)
    steps = {"lorakit": make_step(ours, batch), "hf": make_step(theirs, batch)}
    # One step per round, the two sides in turn, after one warm-up step each (first-call allocations).
    times = interleaved_latency(steps, rounds=args.repeats, repeats=1)
    t_ours, t_theirs = times["lorakit"]["seconds"], times["hf"]["seconds"]
    spread = max(times["lorakit"]["spread"], times["hf"]["spread"])
    ratio = t_ours / t_theirs
    print(f"{allocator:>9} {name:>9} {t_ours:10.3f} {t_theirs:11.3f} {ratio:6.2f}   (spread over rounds {spread:.0%})")
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            steps["lorakit"]()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
