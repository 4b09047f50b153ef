"""Paged optimizer: optimizer state in fixed-size pages on a slow tier, a budget of them resident.

QLoRA §3 ("Paged Optimizers") uses NVIDIA unified memory: optimizer state lives in pages that the
driver moves to CPU RAM when the GPU runs short (a long-sequence batch, say) and back when the
optimizer step needs them. bitsandbytes' ``PagedAdamW`` does this with ``cudaMallocManaged``.
``PagedOptimizer`` makes the same mechanism explicit and visible, for any elementwise torch
optimizer:

* the state (Adam's ``exp_avg`` and ``exp_avg_sq``...) is laid out in pages of ``page_bytes`` on
  the **slow tier**: pinned CPU memory when the parameters are on a GPU, a memory-mapped
  temporary file when they are on the CPU;
* at most ``budget_bytes`` of pages are **resident** on the fast tier (the parameters' device);
* just before a parameter's update its pages are brought in, least-recently-used pages leave
  first (written back), and counters record the bytes moved and the time spent.

A page holds ``K`` rows (one per state tensor) of ``E`` elements; parameters are cut into
segments that each lie in one page. The wrapped optimizer is called on *views* of the parameter,
its gradient and the page rows, so its own arithmetic runs unchanged: the updates equal the
unwrapped optimizer's bit for bit, whatever the budget (``tests/test_paged.py``).

``PagedOptimizer`` is a ``torch.optim.Optimizer``: its ``param_groups`` are the wrapped optimizer's, so
learning-rate schedulers drive it, and ``state_dict`` / ``load_state_dict`` gather the state from
the pages and scatter it back, in the wrapped optimizer's own format (a checkpoint of a paged run
loads into the unpaged optimizer, and back).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from lorakit.adam8bit import AdamW8bit

# Optimizers whose update of one element reads only that element's parameter, gradient and state:
# these may be run on slices of a parameter without changing a bit.
ELEMENTWISE = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD, torch.optim.RMSprop, torch.optim.Adagrad)
# Optimizers whose state is quantized in blocks of ``blocksize`` elements (one absmax per block): exact on
# slices that start on a block boundary of the parameter, which is how their segments are cut.
BLOCKWISE = (AdamW8bit,)


@dataclass
class _Segment:
    """Elements ``[start, stop)`` of ``param`` whose state sits at ``offset`` in every row of ``page``."""

    param: torch.Tensor
    group: int
    layout: int  # index into the optimizer's layouts: what the rows of this segment's page hold
    start: int
    stop: int
    page: int
    offset: int
    scalars: dict | None = None  # non-elementwise state (``step``, 8-bit absmax); None until first update


@dataclass
class _Layout:
    names: tuple[str, ...]  # the elementwise state tensors, e.g. ("exp_avg", "exp_avg_sq")
    dtype: torch.dtype
    per_row: int  # E: elements of one state tensor per page (a multiple of ``align``)
    align: int = 1  # segments start on multiples of this (a blockwise optimizer's block size)


def _remove_file(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class PagedOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer`` so its state lives in pages, at most ``budget_bytes`` of them resident.

    ``page_bytes`` (default 1 MiB) is the unit moved between tiers; ``budget_bytes`` must hold at
    least one page. ``page_dir`` is where the CPU tier's page file goes (default: the system's
    temporary folder). On POSIX systems the file is unlinked as soon as it is memory-mapped: its
    pages stay on disk, reachable only through the mapping, until :meth:`close` releases it, so not
    even a killed process leaves it behind. Elsewhere it is removed by :meth:`close`, when the
    optimizer is garbage collected, and when a step fails (the optimizer is then closed: its state is
    half-updated).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        budget_bytes: int,
        page_bytes: int = 1 << 20,
        page_dir: str | None = None,
    ):
        if not isinstance(optimizer, ELEMENTWISE + BLOCKWISE):
            raise TypeError(
                f"PagedOptimizer: {type(optimizer).__name__} is not supported; it pages elementwise "
                f"and blockwise optimizers only: {', '.join(c.__name__ for c in ELEMENTWISE + BLOCKWISE)}"
            )
        if optimizer.state:
            raise ValueError("PagedOptimizer: wrap the optimizer before its first step (its state is not empty)")
        if page_bytes < 64:
            raise ValueError(f"page_bytes={page_bytes}: a page must hold at least 64 bytes")
        if page_dir is not None and not os.path.isdir(page_dir):
            raise ValueError(
                f"page_dir={page_dir!r} is not a folder; give an existing folder for the page file, "
                "or None for the system's temporary folder"
            )
        if budget_bytes < page_bytes:
            raise ValueError(
                f"budget_bytes={budget_bytes:,} is smaller than one page ({page_bytes:,} bytes): "
                "the fast tier must hold at least one page"
            )
        params = [p for g in optimizer.param_groups for p in g["params"]]
        super().__init__(params, optimizer.defaults)  # hooks and bookkeeping of torch.optim.Optimizer
        self.param_groups = optimizer.param_groups  # the same dicts: a scheduler's lr reaches the wrapped one
        self.optimizer = optimizer
        self.page_bytes = page_bytes
        self.budget_bytes = budget_bytes
        self.max_resident_pages = budget_bytes // page_bytes
        devices = {p.device for p in params}
        if len(devices) != 1:
            raise ValueError(f"PagedOptimizer: all parameters must be on one device, got {sorted(map(str, devices))}")
        self.device = devices.pop()
        self._segments, self._page_layout, self._layouts = self._lay_out_pages()
        n_pages = len(self._page_layout)
        self.path: str | None = None
        if self.device.type == "cuda":  # slow tier: pinned host memory, copied asynchronously
            self._slow = torch.zeros(n_pages * page_bytes, dtype=torch.uint8, pin_memory=True)
        else:  # slow tier: a memory-mapped file on disk
            fd, self.path = tempfile.mkstemp(prefix="lorakit-pages-", suffix=".bin", dir=page_dir)
            self._finalizer = weakref.finalize(self, _remove_file, self.path)
            os.ftruncate(fd, max(1, n_pages * page_bytes))
            os.close(fd)
            self._slow = torch.from_file(self.path, shared=True, size=n_pages * page_bytes, dtype=torch.uint8)
            if os.name == "posix":  # the mapping keeps the file's pages; its name can go now, so that even a
                self._finalizer()  # killed process (SIGKILL, out of memory) leaves no page file behind
        self._resident: OrderedDict[int, torch.Tensor] = OrderedDict()  # page -> frame, LRU first
        self.closed = False
        self.bytes_in = self.bytes_out = 0
        self.page_ins = self.page_outs = self.hits = 0
        self.seconds_paging = 0.0
        self.peak_resident_bytes = 0

    # -- layout ------------------------------------------------------------------------------
    def _probe_numel(self, p: torch.Tensor) -> int:
        """Elements of the throwaway tensor that shows ``p``'s kind of state: AdamW8bit keeps fp32 moments
        for tensors under ``min_8bit_size`` elements and 8-bit codes for larger ones."""
        opt = self.optimizer
        if isinstance(opt, BLOCKWISE) and p.numel() >= opt.min_8bit_size:
            return max(2, opt.min_8bit_size)
        return 2

    def _probe_layout(self, group: dict, numel: int) -> _Layout:
        """Which state tensors are elementwise: step a throwaway ``numel``-element copy of the optimizer."""
        opt = self.optimizer
        p0 = group["params"][0]
        probe = torch.zeros(numel, dtype=p0.dtype, device=p0.device, requires_grad=True)
        probe.grad = torch.zeros_like(probe)
        hyper = {k: v for k, v in group.items() if k != "params"}
        blockwise = isinstance(opt, BLOCKWISE)
        extra = dict(min_8bit_size=opt.min_8bit_size, blocksize=opt.blocksize) if blockwise else {}
        tmp = type(opt)([{"params": [probe], **hyper}], **extra)
        tmp.step()
        state = tmp.state[probe]
        names = tuple(k for k, v in state.items() if torch.is_tensor(v) and v.shape == probe.shape)
        dtypes = {state[k].dtype for k in names} or {p0.dtype}
        if len(dtypes) != 1:
            raise ValueError(f"PagedOptimizer: state tensors {names} have mixed dtypes {dtypes}")
        dtype = dtypes.pop()
        itemsize = torch.empty(0, dtype=dtype).element_size()
        align = opt.blocksize if blockwise else 1
        per_row = self.page_bytes // (max(1, len(names)) * itemsize) // align * align
        if per_row == 0:
            raise ValueError(
                f"page_bytes={self.page_bytes:,} is too small for one block of {align} elements of "
                f"{type(opt).__name__}'s state; use pages of at least "
                f"{align * len(names) * itemsize} bytes"
            )
        return _Layout(names, dtype, per_row, align)

    def _lay_out_pages(self):
        """Cut every parameter into segments that each fit in one page; small ones share a page.

        Parameters whose state looks alike (same group, same state tensors) share pages. With a
        blockwise optimizer each parameter starts on a block boundary of its page row and segments
        hold whole blocks, so a segment's blocks are exactly the whole parameter's blocks.
        """
        segments, page_layout, layouts = [], [], []
        index: dict[tuple[int, int], int] = {}  # (group, probe size) -> layout
        open_page: dict[int, tuple[int | None, int]] = {}  # layout -> (page being filled, elements used)
        for gi, group in enumerate(self.optimizer.param_groups):
            for p in group["params"]:
                key = (gi, self._probe_numel(p))
                if key not in index:
                    index[key] = len(layouts)
                    layouts.append(self._probe_layout(group, key[1]))
                li = index[key]
                layout = layouts[li]
                page, used = open_page.get(li, (None, layout.per_row))
                used = -(-used // layout.align) * layout.align  # the next block boundary
                start = 0
                while start < p.numel():
                    if used >= layout.per_row:
                        page_layout.append(li)
                        page, used = len(page_layout) - 1, 0
                    stop = min(p.numel(), start + layout.per_row - used)
                    segments.append(_Segment(p, gi, li, start, stop, page, used))
                    used += stop - start
                    start = stop
                open_page[li] = (page, used)
        return segments, page_layout, layouts

    def _rows(self, frame: torch.Tensor, page: int) -> torch.Tensor:
        layout = self._layouts[self._page_layout[page]]
        k = max(1, len(layout.names))
        itemsize = torch.empty(0, dtype=layout.dtype).element_size()
        return frame[: k * layout.per_row * itemsize].view(layout.dtype).view(k, layout.per_row)  # (K, E)

    # -- paging ------------------------------------------------------------------------------
    def _slow_page(self, page: int) -> torch.Tensor:
        return self._slow[page * self.page_bytes : (page + 1) * self.page_bytes]

    def _page_in(self, page: int, pinned: set[int]) -> torch.Tensor:
        """Make ``page`` resident (evicting the least recently used unpinned page) and return its frame."""
        if page in self._resident:
            self._resident.move_to_end(page)
            self.hits += 1
            return self._resident[page]
        t0 = time.perf_counter()
        if len(self._resident) >= self.max_resident_pages:
            victim = next(pg for pg in self._resident if pg not in pinned)
            frame = self._resident.pop(victim)
            self._slow_page(victim).copy_(frame, non_blocking=True)  # write back
            self.bytes_out += self.page_bytes
            self.page_outs += 1
        else:
            frame = torch.empty(self.page_bytes, dtype=torch.uint8, device=self.device)
        frame.copy_(self._slow_page(page), non_blocking=True)
        self._resident[page] = frame
        self.bytes_in += self.page_bytes
        self.page_ins += 1
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        self.seconds_paging += time.perf_counter() - t0
        return frame

    @property
    def resident_bytes(self) -> int:
        """Bytes of optimizer state on the fast tier now (never more than ``budget_bytes``)."""
        return len(self._resident) * self.page_bytes

    def state_bytes(self) -> int:
        """Bytes of the slow tier holding the state (all pages): what the memory ledger reports."""
        return self._slow.numel()

    # -- the step ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None) -> None:
        """One update of every parameter with a gradient, window by window of resident pages."""
        if closure is not None:
            raise ValueError("PagedOptimizer.step: closures are not supported; compute the loss before step()")
        if self.closed:
            raise RuntimeError("PagedOptimizer: this optimizer is closed (after close() or a failed step)")
        try:
            window: list[_Segment] = []
            pinned: set[int] = set()
            for seg in self._segments:
                if seg.param.grad is None:
                    continue
                if seg.page not in pinned and len(pinned) == self.max_resident_pages:
                    self._update(window, pinned)
                    window, pinned = [], set()
                if seg.page not in pinned:
                    self._page_in(seg.page, pinned)
                    pinned.add(seg.page)
                window.append(seg)
            if window:
                self._update(window, pinned)
        except BaseException:
            self.close()
            raise

    def _update(self, window: list[_Segment], pinned: set[int]) -> None:
        """Run the wrapped optimizer once on views of the segments of the resident ``pinned`` pages."""
        opt = self.optimizer
        saved_params = [g["params"] for g in opt.param_groups]
        shadows = [[] for _ in opt.param_groups]
        try:
            for seg in window:
                if not seg.param.is_contiguous():
                    raise ValueError("PagedOptimizer: parameters must be contiguous to be updated in segments")
                shadow = seg.param.detach().view(-1)[seg.start : seg.stop]  # shares the parameter's storage
                shadow.grad = seg.param.grad.reshape(-1)[seg.start : seg.stop]
                rows = self._rows(self._resident[seg.page], seg.page)[:, seg.offset : seg.offset + seg.stop - seg.start]
                names = self._layouts[seg.layout].names
                if seg.scalars is not None:  # the state as the optimizer left it, now in the page
                    opt.state[shadow] = {**seg.scalars, **{n: rows[k] for k, n in enumerate(names)}}
                elif isinstance(opt, BLOCKWISE):
                    opt.state[shadow] = self._fresh_blockwise_state(seg, shadow, rows)
                shadows[seg.group].append((shadow, seg, rows))
            for g, group in enumerate(opt.param_groups):
                group["params"] = [s for s, _, _ in shadows[g]]
            opt.step()
            for group_shadows in shadows:
                for shadow, seg, rows in group_shadows:
                    names = self._layouts[seg.layout].names
                    state = opt.state.pop(shadow)
                    for k, n in enumerate(names):
                        # a fresh tensor (the first update, or AdamW8bit's re-quantized codes): page it
                        if state[n].data_ptr() != rows[k].data_ptr():
                            rows[k].copy_(state[n])
                    seg.scalars = {k: v for k, v in state.items() if k not in names}
        finally:
            for group, params in zip(opt.param_groups, saved_params):
                group["params"] = params
            for g in shadows:
                for shadow, _, _ in g:
                    opt.state.pop(shadow, None)

    def _fresh_blockwise_state(self, seg: _Segment, shadow: torch.Tensor, rows: torch.Tensor) -> dict:
        """AdamW8bit's initial state of a segment: 8-bit or fp32 as the whole parameter's would be.

        AdamW8bit picks fp32 moments for tensors under ``min_8bit_size`` elements; a segment of a large
        parameter may be that small, so the choice is made here for the parameter, not the segment.
        """
        opt = self.optimizer
        threshold = opt.min_8bit_size
        opt.min_8bit_size = 0 if seg.param.numel() >= threshold else math.inf
        try:
            state = opt._init_state(shadow)
        finally:
            opt.min_8bit_size = threshold
        for k, name in enumerate(self._layouts[seg.layout].names):
            rows[k].copy_(state[name])
            state[name] = rows[k]
        return state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        if hasattr(self, "optimizer"):  # torch.optim.Optimizer.__init__ adds the first groups itself
            raise TypeError(
                "PagedOptimizer: the pages are laid out once; give every parameter group to the "
                "wrapped optimizer before wrapping it"
            )
        super().add_param_group(param_group)

    # -- checkpoints -------------------------------------------------------------------------
    def _indexed_params(self) -> list[torch.Tensor]:
        """Parameters in state-dict order: as torch numbers them, group after group."""
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        """The wrapped optimizer's ``state_dict``, with the state gathered from the pages."""
        index = {id(p): i for i, p in enumerate(self._indexed_params())}
        groups = []
        for g in self.param_groups:
            hyper = {k: v for k, v in g.items() if k != "params"}
            groups.append({**hyper, "params": [index[id(p)] for p in g["params"]]})
        state = {}
        for p in self._indexed_params():
            full = self.state_of(p)
            if full:
                state[index[id(p)]] = full
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Scatter a ``state_dict`` (of this optimizer, or of the unpaged one) into the pages."""
        if self.closed:
            raise RuntimeError("PagedOptimizer: this optimizer is closed (after close() or a failed step)")
        groups = state_dict["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError(
                "PagedOptimizer.load_state_dict: the state dict's parameter groups do not match "
                "this optimizer's (another model, or other parameter groups?)"
            )
        for group, saved in zip(self.param_groups, groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self._write_back_all()
        params = self._indexed_params()
        for seg in self._segments:
            seg.scalars = None
        for i, full in state_dict["state"].items():
            self._scatter(params[int(i)], full)

    @staticmethod
    def _per_block(layout: _Layout, value) -> bool:
        """Is ``value`` a blockwise optimizer's one-value-per-block state (AdamW8bit's absmax)?"""
        return layout.align > 1 and torch.is_tensor(value) and value.ndim == 1

    def _write_back_all(self) -> None:
        """Copy every resident page back to the slow tier and release the fast tier."""
        for page, frame in self._resident.items():
            self._slow_page(page).copy_(frame)
        self._resident.clear()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _scatter(self, param: torch.Tensor, full: dict) -> None:
        """Write ``param``'s full state into its segments' page rows and scalars (slow tier)."""
        for seg in (s for s in self._segments if s.param is param):
            layout = self._layouts[seg.layout]
            names = layout.names
            seg.scalars = {}
            for key, value in full.items():
                if key in names:
                    continue
                if self._per_block(layout, value):  # this segment's blocks only
                    blocks = value[seg.start // layout.align : -(-seg.stop // layout.align)]
                    seg.scalars[key] = blocks.clone().to(self.device)
                else:
                    seg.scalars[key] = value.clone() if torch.is_tensor(value) else value
            rows = self._rows(self._slow_page(seg.page), seg.page)  # (K, E), a view of the slow tier
            for k, name in enumerate(names):
                value = full[name].reshape(-1)[seg.start : seg.stop]
                rows[k, seg.offset : seg.offset + seg.stop - seg.start].copy_(value)

    def state_of(self, param: torch.Tensor) -> dict:
        """``param``'s full state, gathered from the pages (for inspection and tests)."""
        segs = [s for s in self._segments if s.param is param]
        if not segs or segs[0].scalars is None:
            return {}
        layout = self._layouts[segs[0].layout]
        if self.device.type == "cuda":  # write-backs to pinned memory are asynchronous
            torch.cuda.synchronize(self.device)
        out = {}
        for key, value in segs[0].scalars.items():
            if self._per_block(layout, value):  # one value per block: every segment holds its blocks' values
                out[key] = torch.cat([s.scalars[key] for s in segs]).clone()
            else:
                out[key] = value.clone() if torch.is_tensor(value) else value
        for k, name in enumerate(layout.names):
            parts = []
            for s in segs:
                frame = self._resident.get(s.page, None)
                src = frame if frame is not None else self._slow_page(s.page).to(self.device)
                parts.append(self._rows(src, s.page)[k, s.offset : s.offset + s.stop - s.start])
            out[name] = torch.cat(parts).view_as(param).clone()
        return out

    def counters(self) -> dict:
        """Bytes moved, pages moved, hits and seconds spent paging since construction."""
        return dict(
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            page_ins=self.page_ins,
            page_outs=self.page_outs,
            hits=self.hits,
            seconds_paging=self.seconds_paging,
            peak_resident_bytes=self.peak_resident_bytes,
        )

    def close(self) -> None:
        """Release both tiers and remove the page file. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._resident.clear()
        self._slow = torch.empty(0, dtype=torch.uint8)
        if self.path is not None:
            self._finalizer()  # removes the file once, and never again at garbage collection

    def __enter__(self) -> PagedOptimizer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        tier = "pinned CPU memory" if self.device.type == "cuda" else "a memory-mapped file"
        return (
            f"PagedOptimizer({type(self.optimizer).__name__}, {len(self._page_layout)} pages of "
            f"{self.page_bytes:,} B on {tier}, budget {self.max_resident_pages} pages on {self.device})"
        )
