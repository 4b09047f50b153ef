"""``python -m lorakit.memory 65B --method qlora``: the estimator's breakdown on the command line."""

from __future__ import annotations

import argparse
import sys

from lorakit.memory.estimate import DTYPE_BYTES, METHODS, STATE_BYTES_PER_PARAM, check_fit, estimate_memory


def main(argv: list[str] | None = None) -> int:
    """``python -m lorakit.memory 65B --method qlora``: print the breakdown and the total."""
    parser = argparse.ArgumentParser(prog="python -m lorakit.memory", description=main.__doc__)
    parser.add_argument("model", help="'7B', '13B', '33B', '65B' (LLaMA), or a size such as '1.5B', '350M'")
    parser.add_argument("--method", choices=METHODS, default="qlora")
    parser.add_argument("--bits", type=int, default=None)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--targets", default="all", help="'all' or a comma list such as q_proj,v_proj")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--optimizer", choices=tuple(STATE_BYTES_PER_PARAM), default="adamw")
    parser.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bfloat16")
    parser.add_argument("--gpu-gb", type=float, default=None, help="also say whether it fits")
    args = parser.parse_args(argv)
    targets = args.targets if args.targets == "all" else tuple(args.targets.split(","))
    kwargs = dict(
        model=args.model,
        method=args.method,
        bits=args.bits,
        rank=args.rank,
        targets=targets,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        optimizer=args.optimizer,
        gradient_checkpointing=args.gradient_checkpointing,
        dtype=args.dtype,
    )
    try:
        print(check_fit(args.gpu_gb, **kwargs) if args.gpu_gb else estimate_memory(**kwargs))
    except ValueError as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
