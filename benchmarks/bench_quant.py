"""lorakit's 4-bit quantize / dequantize time over bitsandbytes' CPU time (4096 x 4096, NF4).

Prints medians of several runs and their ratios (target: at most 1.0). No assertions on time.
Run: ``python benchmarks/bench_quant.py [--repeats 7]``

For dequantize it also prints a floor, measured in the same run: the time to allocate the output
tensor and write it once (``torch.empty(...).fill_``), which any dequantize that returns a new
tensor pays. Whether that allocation reuses memory or takes fresh pages from the kernel (page
faults, about 1 ms per 4 MB here) depends on the allocator's state, so compare each row with its
floor, not with another run's.
"""

from __future__ import annotations

import argparse
import warnings

import torch

import lorakit
from lorakit.timing import median_time  # median of repeats after one warm-up call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import bitsandbytes.functional as bnb

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size}x{args.size}, "
        f"median of {args.repeats}"
    )
    print(f"{'dtype':>9} {'op':>10} {'lorakit s':>10} {'bnb s':>8} {'ratio':>6}")
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0)).to(dtype)
        packed, state = lorakit.quantize_4bit(w, "nf4", 64)
        ref_packed, ref_state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
        assert torch.equal(packed, ref_packed), "the benchmark compares equal work only"
        rows = [
            (
                "quantize",
                lambda w=w: lorakit.quantize_4bit(w, "nf4", 64),
                lambda w=w: bnb.quantize_4bit(w, blocksize=64, quant_type="nf4"),
            ),
            (
                "dequantize",
                lambda packed=packed, state=state: lorakit.dequantize_4bit(packed, state),
                lambda packed=ref_packed, state=ref_state: bnb.dequantize_4bit(packed, state),
            ),
        ]
        for op, ours, theirs in rows:
            t_ours, t_theirs = median_time(ours, args.repeats), median_time(theirs, args.repeats)
            line = f"{str(dtype).split('.')[-1]:>9} {op:>10} {t_ours:10.4f} {t_theirs:8.4f} {t_ours / t_theirs:6.2f}"
            if op == "dequantize":
                floor = median_time(lambda w=w, dtype=dtype: torch.empty(w.shape, dtype=dtype).fill_(1.0), args.repeats)
                line += (
                    f"   floor {floor:.4f} s: lorakit {t_ours / floor:.1f}x it, bitsandbytes {t_theirs / floor:.1f}x"
                )
            print(line)


if __name__ == "__main__":
    main()
