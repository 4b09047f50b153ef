"""Silence, once and narrowly, the stderr lines that lorakit's libraries print and a learner reads as errors.

Each rule names its source, matches one message from one module, and leaves everything else alone
(a different warning from the same module, or the same category from anywhere else, still shows):

- bitsandbytes 0.50 logs ``Failed to load CPU gemm_4bit_forward from kernels-community: No module
  named 'kernels' ...`` at import on CPUs with AVX512-BF16 (``bitsandbytes/backends/cpu/ops.py``,
  logger ``bitsandbytes.backends.cpu.ops``). The optional ``kernels`` package only offers a fused
  bfloat16 kernel that lorakit switches off anyway (:func:`lorakit.models.keep_bnb_reference_path`);
  peft imports bitsandbytes, so ``import peft`` prints it too.
- transformers 5 warns ``is_gradient_checkpointing is deprecated`` (a ``FutureWarning`` raised in
  ``transformers/modeling_utils.py``) whenever peft 0.21 wraps a model: a note to peft's authors,
  printed with a machine path.
- transformers draws a ``Loading weights`` progress bar in every ``from_pretrained``; a load of a few
  seconds needs none. :func:`loading` turns the bars off for one load and restores the setting.

:func:`install` runs when :mod:`lorakit.models` is imported, so ``import lorakit`` is enough.
It is idempotent. A ``warnings.catch_warnings()`` block (pytest wraps each test in one) restores
the filters it found on entry, so the functions that load or import call it again.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
GRADIENT_CHECKPOINTING_MESSAGE = r"`is_gradient_checkpointing` is deprecated"
GRADIENT_CHECKPOINTING_MODULE = r"transformers\.modeling_utils"


class DropMessage(logging.Filter):
    """A logger filter that drops the records whose message template starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install() -> None:
    """Add the two filters above (at most once each); bitsandbytes need not be imported yet."""
    logger = logging.getLogger(BNB_CPU_LOGGER)  # the very logger bitsandbytes' module will get
    if not any(isinstance(f, DropMessage) and f.prefix == BNB_KERNELS_MESSAGE for f in logger.filters):
        logger.addFilter(DropMessage(BNB_KERNELS_MESSAGE))
    # filterwarnings replaces an identical filter instead of adding a second one
    warnings.filterwarnings(
        "ignore", message=GRADIENT_CHECKPOINTING_MESSAGE, category=FutureWarning, module=GRADIENT_CHECKPOINTING_MODULE
    )


def import_bitsandbytes():
    """``import bitsandbytes`` without its note about the optional ``kernels`` package; returns the module."""
    install()
    import bitsandbytes

    return bitsandbytes


@contextmanager
def loading() -> Iterator[None]:
    """No transformers progress bars inside the block (``from_pretrained``'s "Loading weights");
    the setting found on entry is restored on exit."""
    from transformers.utils import logging as hf_logging

    install()
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
