"""Wall-clock timing, in one place: the median of repeated calls, interleaved rounds, stages, decoding speed.

Every figure is a median, not a mean, so one call slowed by another process does not move it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"median_time needs repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_latency(fns: dict[str, Callable[[], object]], rounds: int, repeats: int) -> dict:
    """Median seconds of each ``fn``, timed in interleaved rounds so load on the machine hits all alike.

    Every round times every function (:func:`median_time` over ``repeats`` calls, after one warm-up
    call each before the first round); the result is the median over rounds, and ``spread`` is
    (max - min) / median over rounds: the noise.
    """
    if rounds < 1:
        raise ValueError(f"interleaved_latency needs rounds >= 1, got rounds={rounds}")
    for fn in fns.values():  # warm up once each
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(median_time(fn, repeats=repeats, warmup=0))
    return {
        name: dict(seconds=statistics.median(t), spread=(max(t) - min(t)) / statistics.median(t))
        for name, t in times.items()
    }


class StageClock:
    """Seconds per stage of a long job (where its time goes): call ``clock("stage")`` at the end of each stage."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._last, 2)
        self._last = now


@torch.no_grad()
def tokens_per_second(model, tokenizer, prompt: str, new_tokens: int = 32, repeats: int = 3) -> float:
    """Greedy decoding speed: ``new_tokens`` generated after ``prompt``, divided by the median time.

    Exactly ``new_tokens`` are generated (the end-of-text token does not stop early), so models that
    answer differently are timed on the same amount of work; the time includes reading the prompt.
    One untimed warm-up run first, then the median of ``repeats`` (:func:`median_time`).
    """
    if new_tokens < 1 or repeats < 1:
        raise ValueError(f"need new_tokens >= 1 and repeats >= 1, got new_tokens={new_tokens}, repeats={repeats}")
    inputs = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def run():
        model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad
        )
        if inputs["input_ids"].is_cuda:
            torch.cuda.synchronize()  # the clock must wait for the GPU

    return new_tokens / median_time(run, repeats=repeats, warmup=1)
