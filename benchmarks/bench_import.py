"""How long ``import lorakit`` takes in a fresh Python process (target: at most 3 s).

Each run is a new interpreter, so nothing is cached in memory; the median of ``--repeats`` runs is
printed, with ``import torch`` alone beside it (the floor lorakit cannot go below). No assertions.
Run: ``python benchmarks/bench_import.py [--repeats 5]``
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def fresh_import_seconds(module: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    fresh_import_seconds("lorakit")  # warm the file system cache once
    times = {"torch": [], "lorakit": []}
    for _ in range(args.repeats):  # interleaved, so a busy moment slows both
        for module in times:
            times[module].append(fresh_import_seconds(module))
    for module, seconds in times.items():
        print(f"import {module:<8} {statistics.median(seconds):6.2f} s (median of {args.repeats} fresh processes)")


if __name__ == "__main__":
    main()
