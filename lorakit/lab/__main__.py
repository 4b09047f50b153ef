"""``python -m lorakit.lab [--full] [--json PATH] [--markdown PATH]``: the claims table, measured here."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from lorakit.lab import LabConfig, run_lab
from lorakit.runtime import run_main


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not valid; it must be at least 1")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    quick, full = LabConfig(), LabConfig.full_settings()
    p = argparse.ArgumentParser(
        prog="python -m lorakit.lab",
        description="Fine-tune SmolLM2 four ways (full, LoRA, QLoRA NF4, QLoRA FP4) with the same data, steps and "
        "seed, and check the LoRA-vs-QLoRA articles' claims against the measurements.",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help=f"the longer run ({full.steps} steps of {full.batch_size} x {full.seq_len} tokens; "
        f"quick: {quick.steps} steps of {quick.batch_size} x {quick.seq_len})",
    )
    p.add_argument("--steps", type=_positive_int, help="training steps of every run")
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--seq-len", type=_positive_int)
    p.add_argument("--eval-blocks", type=_positive_int, help="held-out blocks for perplexity")
    p.add_argument("--train-blocks", type=_positive_int, help="blocks of training text to tokenize")
    p.add_argument("--rank", type=_positive_int, help="LoRA rank r")
    p.add_argument("--latency-rounds", type=_positive_int, help="interleaved timing rounds of the latency measurement")
    p.add_argument("--latency-repeats", type=_positive_int, help="forward passes per model per round")
    p.add_argument("--spike-seq-len", type=int, help="tokens of the long batch in the paging measurement (0: skip)")
    p.add_argument(
        "--sweep-ranks",
        type=_positive_int,
        nargs="+",
        metavar="R",
        help=f"LoRA ranks trained beside --rank in the variants job (quick: {' '.join(map(str, quick.sweep_ranks))})",
    )
    p.add_argument(
        "--batch-budget-mb", type=_positive_int, help="memory budget of the 'larger batches' claim, in MB (10^6 bytes)"
    )
    p.add_argument(
        "--no-variants",
        action="store_true",
        help="skip the variants job (targets, ranks, bf16 adapters, paging, 4-bit op, task switch)",
    )
    p.add_argument("--device", help="cpu, cuda, ... (default: CUDA when there is one)")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run everything in this process (faster start; peak RSS is then the process's, not each run's)",
    )
    p.add_argument("--json", metavar="PATH", help="write {claims, runs} as JSON here")
    p.add_argument("--markdown", metavar="PATH", help="write the claims table as Markdown here")
    p.add_argument("--adapters", metavar="DIR", help="keep the trained adapters in this folder")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="show an error's traceback (lorakit.runtime.run_main)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    config = LabConfig.full_settings() if a.full else LabConfig()
    overrides = {
        name: getattr(a, name) for name in (f.name for f in fields(LabConfig)) if getattr(a, name, None) is not None
    }
    if a.in_process:
        overrides["isolate"] = False
    if a.no_variants:
        overrides["variants"] = False
    if a.sweep_ranks:
        overrides["sweep_ranks"] = tuple(a.sweep_ranks)
    try:
        config = LabConfig(**{**config.__dict__, **overrides})
        config.validate()
    except ValueError as e:
        print(f"python -m lorakit.lab: error: {e}", file=sys.stderr)
        return 2
    lab = run_lab(config, adapter_dir=a.adapters, progress=not a.no_progress)
    print(lab.markdown())
    if a.json:
        lab.write_json(a.json)
        print(f"wrote {a.json}")
    if a.markdown:
        lab.write_markdown(a.markdown)
        print(f"wrote {a.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="python -m lorakit.lab"))
