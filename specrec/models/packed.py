"""Projection weights pre-packed for oneDNN on the CPU: the inference forward's linear layers (float32, bfloat16).

`F.linear` on the CPU repacks the weight matrix on every call; for the few rows a decode step or a draft tree
feeds, that repacking is most of the cost (bench-size target, 8 layers, 1 thread: 6.6 ms for one token, 15 ms for
16, against 3.5 and 6.1 ms packed once). The packed kernel is checked against F.linear once per process; like
F.linear, it may round a token differently by batch shape (~1e-6 in float32, see `specrec.models.precision`).
Used only without autograd, on float32 or bfloat16 CPU tensors; anything else (training, a GPU) takes `linear(x)`.
In bfloat16 the batch-invariant forward's projections go through it too, and `specrec.models.precision` checks that
these kernels give a row the same bits in any batch before bfloat16 is served.
`SPECREC_PACKED_WEIGHTS=off` turns it off (for A/B runs).

Which kernel is faster depends on the machine and the row count: on an AMD EPYC (AVX2, no AVX-512) one row through
the packed kernel took 2x F.linear's time (256 -> 768: 88 vs 41 us), 8 rows 0.75x. Callers that may pick (`timed=True`,
the drafter: its rounding never reaches a committed token) run on whichever kernel made their whole forward faster
when both were timed on this machine (`choose_kernel_by_rows`), per row count rounded up to a power of two (timing
each product alone did no better in three runs; a whole forward is what a draft step costs).
`SPECREC_PACKED_WEIGHTS=on`: always packed.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

# per nn.Linear: (the weight's identity and version it was packed from, the packed weight); kept beside the module,
# not on it, so that copying or pickling a model never meets an opaque oneDNN tensor
_packed: weakref.WeakKeyDictionary[nn.Linear, tuple[tuple[int, int], torch.Tensor]] = weakref.WeakKeyDictionary()
# per group of nn.Linear sharing an input, keyed by its first: (the group's identity and weight stamps, their weights
# stacked and packed; and, made only where F.linear runs them, the stacked weights as they are
_fused: weakref.WeakKeyDictionary[nn.Linear, tuple[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()
_stacked: weakref.WeakKeyDictionary[nn.Linear, tuple[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()
# per row count rounded up to a power of two: timed callers run on packed weights (absent: they do)
_packed_rows: dict[int, bool] = {}
_forced: bool | None = None  # the kernel every timed caller takes while `choose_kernel_by_rows` times it
TIMED_ROWS = 32  # past this many rows timed callers take the packed kernel untimed (it wins on large batches)
_available: dict[torch.dtype, bool] = {}  # per dtype: packing_available()
_dense = False  # dense_projections() in force
PACKED_DTYPES = (torch.float32, torch.bfloat16)
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _usable(w: torch.Tensor, x: torch.Tensor) -> bool:
    return not torch.is_grad_enabled() and x.dtype == w.dtype and w.device.type == "cpu" and x.dim() == 2 \
        and not _dense and packing_available(w.dtype)


def _stamp(w: torch.Tensor) -> tuple[int, int]:
    return w.data_ptr(), 0 if w.is_inference() else w._version  # inference tensors keep no version counter


def packed_linear(linear: nn.Linear, x: torch.Tensor, timed: bool = False) -> torch.Tensor:
    """linear(x) for x [N, in]; through the weight packed once, when this is float32 or bfloat16 inference on the
    CPU (timed: and the packed kernel made the caller's forward faster at this many rows here)."""
    w = linear.weight
    if not _usable(w, x) or (timed and not packed_for(len(x))):
        return linear(x)
    packed = _packed_weight(_packed, linear, _stamp(w), w.detach)
    bias = None if linear.bias is None else linear.bias.detach()
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _packed_weight(store: weakref.WeakKeyDictionary, key: nn.Linear, stamp: tuple,
                   weight: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The packed copy of weight() kept under `key`, packed again when the weights were replaced or changed."""
    return _kept(store, key, stamp, lambda: torch.ops.mkldnn._reorder_linear_weight(weight(), None))


def _kept(store: weakref.WeakKeyDictionary, key: nn.Linear, stamp: tuple,
          make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """make() kept under `key`, made again when the weights it came from were replaced or changed (stamp)."""
    entry = store.get(key)
    if entry is None or entry[0] != stamp:
        entry = (stamp, make())
        store[key] = entry
    return entry[1]


def packed_for(rows: int) -> bool:
    """Whether a timed caller runs `rows` rows on packed weights (see `choose_kernel_by_rows`)."""
    if _forced is not None:
        return _forced
    return _packed_rows.get(1 << max(rows - 1, 0).bit_length(), True)


def choose_kernel_by_rows(forward: Callable[[int], object], repeats: int = 7) -> dict[str, str]:
    """Time forward(rows) with timed callers on packed weights and on F.linear, interleaved, at 1, 2, 4 ...
    TIMED_ROWS rows, and keep the faster kernel per row count for them; returns the choice, e.g. {"1 row": "dense"}.
    The best of `repeats` runs decides (a busy core only ever adds time: the other services load beside a drafter).
    With `SPECREC_PACKED_WEIGHTS=on` nothing is timed: packed everywhere."""
    global _forced
    buckets = [1 << i for i in range(TIMED_ROWS.bit_length())]
    if os.environ.get("SPECREC_PACKED_WEIGHTS", "auto").lower() in ("on", "1", "true"):
        _packed_rows.update(dict.fromkeys(buckets, True))
        return kernel_choices()
    for rows in buckets:
        seconds: dict[bool, list[float]] = {True: [], False: []}
        for i in range(repeats + 1):  # the first run of each packs weights and warms up
            for kernel in (True, False) if i % 2 else (False, True):
                _forced = kernel
                t0 = time.perf_counter()
                try:
                    forward(rows)
                finally:
                    _forced = None
                seconds[kernel].append(time.perf_counter() - t0)
        _packed_rows[rows] = min(seconds[True][1:]) < min(seconds[False][1:])
    return kernel_choices()


def stacked_linear(linears: Sequence[nn.Linear], x: torch.Tensor, timed: bool = False) -> torch.Tensor:
    """torch.cat([linear(x) for linear in linears], -1) for bias-free layers of one input (e.g. q, k and v), as one
    product over their weights stacked and packed once. At the one to eight rows a draft step feeds, a kernel call's
    fixed cost is most of its time: q, k, v as one call took ~50 us against ~105 us as three (256 -> 3 x 256, one
    thread). timed: as in `packed_linear`."""
    w = linears[0].weight
    if not _usable(w, x) or any(lin.bias is not None for lin in linears):
        return torch.cat([lin(x) for lin in linears], dim=-1)
    stamp = tuple((id(lin), *_stamp(lin.weight)) for lin in linears)

    def stacked() -> torch.Tensor:
        return torch.cat([lin.weight.detach() for lin in linears])

    if timed and not packed_for(len(x)):
        return F.linear(x, _kept(_stacked, linears[0], stamp, stacked))
    return torch.ops.mkldnn._linear_pointwise(x, _packed_weight(_fused, linears[0], stamp, stacked), None, "none", [],
                                              "")


def is_packed(linear: nn.Linear) -> bool:
    """Whether an inference forward has run this layer on packed weights (alone, or first of a stacked group)."""
    return linear in _packed or linear in _fused


def kernel_choices() -> dict[str, str]:
    """The kernel timed callers take per row count here, e.g. {"1 row": "dense", "2 rows": "packed"}."""
    return {f"{rows} row{'s' * (rows > 1)}": "packed" if packed else "dense"
            for rows, packed in sorted(_packed_rows.items())}


def packing_available(dtype: torch.dtype = torch.float32) -> bool:
    """oneDNN's packed linear exists here for `dtype`, is not switched off, and passes the check below (once per
    process and dtype)."""
    if dtype not in _available:
        _available[dtype] = dtype in PACKED_DTYPES and torch.backends.mkldnn.is_available() \
            and os.environ.get("SPECREC_PACKED_WEIGHTS", "auto").lower() not in ("off", "0", "false") \
            and _packed_matches_dense(dtype)
    return _available[dtype]


@torch.inference_mode()
def _packed_matches_dense(dtype: torch.dtype) -> bool:
    """The packed kernel computes what F.linear computes (to the dtype's rounding) on this machine; else it is not
    used."""
    try:
        gen = torch.Generator().manual_seed(0)
        w, x = torch.randn(96, 64, generator=gen).to(dtype), torch.randn(17, 64, generator=gen).to(dtype)
        out = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, None), None, "none",
                                                 [], "")
    except (RuntimeError, AttributeError, NotImplementedError):  # an op this build of torch lacks
        return False
    tol = _TOLERANCE[dtype]
    return torch.allclose(out.float(), x.float() @ w.float().T, rtol=tol, atol=tol * 8)


@contextmanager
def dense_projections() -> Iterator[None]:
    """F.linear for every projection meanwhile (benchmarks measure both ways in one process)."""
    global _dense
    _dense, before = True, _dense
    try:
        yield
    finally:
        _dense = before
