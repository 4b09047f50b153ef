"""``python -m lorakit.finetune --method qlora --rank 8 --bits 4 --steps N --out DIR``.

With ``--data my.jsonl`` (or ``.csv``) it instruction-tunes on the learner's own conversations instead
of the corpus (:mod:`lorakit.chat`): a malformed line is refused, with its line number, before anything
is loaded; a share of the examples is held out (``--test-fraction``); metrics.json holds the held-out
loss per answer token and the exact-match accuracy of the held-out answers, before and after.

Bad settings, a missing asset or an output folder that holds something else end with one line on
stderr and exit code 2 (``--debug`` shows the traceback); a diverged run exits with 1.
"""

from __future__ import annotations

import argparse
import sys

from lorakit.codebooks import BITS, KINDS
from lorakit.finetune.config import BACKENDS, FinetuneConfig
from lorakit.finetune.output import RunComplete, summary
from lorakit.finetune.pipeline import finetune
from lorakit.memory import METHODS
from lorakit.runtime import run_main
from lorakit.train import OPTIMIZERS

PROG = "python -m lorakit.finetune"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = FinetuneConfig()
    p = argparse.ArgumentParser(prog=PROG, description="Fine-tune SmolLM2 with full, LoRA or QLoRA.")
    p.add_argument("--method", default=d.method, help=f"one of {', '.join(METHODS)} (default {d.method})")
    p.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank r (default {d.rank})")
    p.add_argument(
        "--alpha", type=float, default=d.alpha, help=f"LoRA alpha; scaling = alpha / r (default {d.alpha:g})"
    )
    p.add_argument("--bits", type=int, default=d.bits, help=f"QLoRA base-weight bits, one of {BITS} (default {d.bits})")
    p.add_argument(
        "--kind",
        default=d.kind,
        help=f"QLoRA codebook family, one of {', '.join(KINDS)} (default {d.kind}; with --bits 4: NF4)",
    )
    p.add_argument("--quant-type", dest="kind", help=argparse.SUPPRESS)  # the old name of --kind
    p.add_argument("--blocksize", type=int, default=d.blocksize)
    p.add_argument("--no-double-quant", action="store_true", help="keep the absmax constants in float32")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-4; full: 2e-5)")
    p.add_argument("--optimizer", default=d.optimizer, help=f"one of {', '.join(OPTIMIZERS)} (default {d.optimizer})")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--eval-blocks", type=int, default=d.eval_blocks)
    p.add_argument("--train-blocks", type=int, default=None, help="cap on training blocks")
    p.add_argument("--corpus", default=d.corpus)
    p.add_argument(
        "--data", default=None, help="a .jsonl or .csv file of conversations to instruction-tune on (not --corpus)"
    )
    p.add_argument("--test-fraction", type=float, default=d.test_fraction, help="with --data: share held out")
    p.add_argument(
        "--model", default=d.model, help=f"an offline asset, a local checkpoint folder, or a hub id (default {d.model})"
    )
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--backend", default=d.backend, help=f"one of {', '.join(BACKENDS)} (default {d.backend})")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the CPU)")
    p.add_argument("--out", required=True, help="output folder for run.json, checkpoints, the adapter and metrics.json")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a lorakit run in --out (never other files: a folder holding those is refused)",
    )
    p.add_argument("--force", action="store_true", help="train even when the memory estimate exceeds the free memory")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="show an error's traceback (lorakit.runtime.run_main)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    config = FinetuneConfig(
        method=a.method,
        rank=a.rank,
        alpha=a.alpha,
        bits=a.bits,
        kind=a.kind,
        blocksize=a.blocksize,
        double_quant=not a.no_double_quant,
        steps=a.steps,
        lr=a.lr,
        optimizer=a.optimizer,
        batch_size=a.batch_size,
        grad_accum=a.grad_accum,
        seq_len=a.seq_len,
        eval_blocks=a.eval_blocks,
        train_blocks=a.train_blocks,
        corpus=a.corpus,
        data=a.data,
        test_fraction=a.test_fraction,
        model=a.model,
        gradient_checkpointing=a.gradient_checkpointing,
        seed=a.seed,
        backend=a.backend,
    )
    try:
        result = finetune(
            config, out=a.out, overwrite=a.overwrite, device=a.device, progress=not a.no_progress, force=a.force
        )
    except RunComplete as done:
        print(
            f"complete: the run in {a.out} has finished already ({summary(done.metrics)}); "
            "its adapter and metrics.json are there. Use another --out, or --overwrite, to train again"
        )
        return 0
    m = result.metrics
    if a.data is not None:
        return _report_data_run(m, a.out)

    def ci(key: str) -> str:
        return f"  (95% CI {m[key][0]:.2f}-{m[key][1]:.2f})" if m.get(key) else ""

    if m["ppl_before"] is not None:
        print(f"held-out perplexity before: {m['ppl_before']:.2f}{ci('ppl_before_ci')}")
    if m["ppl_after"] is not None:
        change = 100 * (m["ppl_after"] / m["ppl_before"] - 1)
        print(f"held-out perplexity after:  {m['ppl_after']:.2f}{ci('ppl_after_ci')}  ({change:+.1f}%)")
    rate = f" ({m['seconds_per_step']:.2f} s/step)" if m["seconds_per_step"] else ""
    print(
        f"{m['steps']} steps, {m['steps_this_process']} of them in this process in {m['seconds']:.1f} s{rate}; "
        f"peak RSS {m['peak_rss_mb']:.0f} MB"
    )
    share = 100 * m["trainable_params"] / m["total_params"]
    print(
        f"trainable {m['trainable_params']:,} of {m['total_params']:,} parameters ({share:.2f}%); "
        f"the base model has {m['base_params'] / 1e6:.1f} M"
    )
    if m["interrupted"]:
        print(
            "interrupted: no evaluation after training; run the same command again to resume from the last checkpoint"
        )
    if m["diverged"]:
        d = m["diverged"]
        kept = (
            f"the checkpoint of step {d['last_good_step']} stays in {a.out}/checkpoint"
            if d["last_good_step"]
            else "no checkpoint was written before it"
        )
        print(
            f"{PROG}: diverged at step {d['step']}: {d['reason']}. No adapter was saved; {kept}; "
            f"{a.out}/metrics.json records the divergence",
            file=sys.stderr,
        )
        return 1
    return 0


def _report_data_run(m: dict, out: str) -> int:
    e = m["examples"]
    print(
        f"{m['data']}: {e['train']} training and {e['test']} held-out examples; "
        f"{e['too_long_dropped']} over {e['max_len']} tokens dropped"
    )
    after = m["heldout_loss_after"]
    print(
        f"held-out loss per answer token: {m['heldout_loss_before']:.3f} before"
        + (f", {after:.3f} after" if after is not None else "")
    )

    def acc(key: str) -> str:
        low, high = m[f"{key}_ci"]
        return f"{m[key]:.1%} (95% CI {low:.1%}-{high:.1%})"

    print(
        "exact-match accuracy of the held-out answers: "
        + acc("accuracy_before")
        + (f" before, {acc('accuracy_after')} after" if m["accuracy_after"] is not None else " before")
    )
    print(f"{m['steps']} steps in {m['seconds']:.1f} s; adapter and metrics.json in {out}")
    if m["diverged"]:
        print(f"{PROG}: diverged at step {m['diverged']['step']}: {m['diverged']['reason']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog=PROG))
