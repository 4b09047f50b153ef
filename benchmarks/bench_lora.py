"""lorakit's LoRA against peft's: forward + backward step time on the same SmolLM2 batch.

Prints the median step time of each and their ratio (target: lorakit / peft <= 1.05). The two
models take turns, so a slow moment of the machine falls on both. A benchmark, not a test:
it asserts nothing about time.

    python benchmarks/bench_lora.py [--repeats 7] [--batch-size 4] [--seq-len 128] [--rank 8]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from lorakit import add_lora, load_base_model, lora_layers
from lorakit.data import split_documents, tokenize_blocks
from lorakit.lora import LLAMA_PROJECTIONS

TARGETS = list(LLAMA_PROJECTIONS)  # every linear layer of the decoder blocks


def step(model, batch) -> None:
    """One forward + backward pass, gradients then dropped."""
    model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base, tokenizer = load_base_model()
    ours = add_lora(copy.deepcopy(base), TARGETS, r=args.rank, alpha=2 * args.rank).train()
    theirs = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS)
    ).train()
    peft_layers = dict(theirs.base_model.model.named_modules())
    with torch.no_grad():  # the same A and B in both
        for name, layer in lora_layers(ours).items():
            layer.lora_B.normal_(std=0.01)
            peft_layers[name].lora_A["default"].weight.copy_(layer.lora_A)
            peft_layers[name].lora_B["default"].weight.copy_(layer.lora_B)
    del base
    train_docs, _ = split_documents("shakespeare")
    ids = tokenize_blocks(tokenizer, train_docs[:1], seq_len=args.seq_len, max_blocks=args.batch_size)  # (B, T)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        diff = (ours(**batch).logits - theirs(**batch).logits).abs().max().item()

    times = {"lorakit": [], "peft": []}
    step(ours, batch)  # warm-up
    step(theirs, batch)
    for _ in range(args.repeats):
        for name, model in (("lorakit", ours), ("peft", theirs)):
            start = time.perf_counter()
            step(model, batch)
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"SmolLM2-135M, LoRA r={args.rank} on {', '.join(TARGETS)}; batch {tuple(ids.shape)}; "
        f"{torch.get_num_threads()} threads; logits max abs diff {diff:.1e}"
    )
    for name, t in med.items():
        print(
            f"{name:8s} forward+backward: median {1000 * t:8.1f} ms over {args.repeats} runs "
            f"(min {1000 * min(times[name]):.1f}, max {1000 * max(times[name]):.1f})"
        )
    print(f"ratio lorakit / peft: {med['lorakit'] / med['peft']:.3f}  (target <= 1.05)")
    # On a busy machine the fastest run of each is the least disturbed one; shown beside the median.
    print(f"ratio of the fastest runs: {min(times['lorakit']) / min(times['peft']):.3f}")


if __name__ == "__main__":
    main()
