"""Softmax attention with a bias shared by the batch, by blocks of explicit
products: the CPU inference kernel for bfloat16 where PyTorch's fused
kernel gains nothing from it.

PyTorch's fused CPU attention kernel multiplies its bfloat16 tiles with
oneDNN's AMX micro-kernels where the CPU has AMX. On a CPU with AVX512-BF16
and no AMX (an AMD EPYC of the Zen 4 family, for one) its bfloat16 tiles
ran hardly faster than float32 ones (Agent-PVT-T at 1024²: 364 against
389 ms of fused attention per forward), while a large bfloat16 ``bmm`` ran
at 2.3 times float32's rate. There each attention is computed as
``addmm`` (the scaled logits plus the bias), ``softmax`` and ``mm``, one
head at a time, over blocks of query rows whose logits stay within
:data:`BLOCK_BYTES`, so that they stay in the caches, in one buffer reused
by every block of the call (a full-size map would be fresh pages at every
call).
Side by side in bfloat16 on that CPU, a forward took 0.77-0.84 of the
fused kernel's time for Agent-PVT-T (1024², 800×1344) and 0.85-0.96 for
Agent-Swin-T (docs/benchmark/precision.md and README.md). With AMX the
fused kernel was 1.3-2.5 times faster than explicit products over whole
maps (blocks were not measured there). In float32 a forward with the
blocks took 0.96-1.11 of the time of one with the fused kernel on that AMD
EPYC, and none was measured with AMX: there the fused kernel stays
(:func:`prefers_blocks`).
:func:`fused_kernel_only` holds every attention of the thread that enters
it to the fused kernel and :func:`blocks_only` to the blocks (in any
precision, on any CPU), to compare the two
(tools/analysis_tools/benchmark_blocked_attention.py).

The logits are rounded to bfloat16 before the softmax, as in any attention
built from bfloat16 products (mmdet's Swin under autocast, say); the
softmax itself accumulates in float32.
"""
import contextlib
import functools
import threading
from typing import Iterator, List, Optional

import torch
from torch import Tensor

from ..utils.cpu_features import AMX_TILE, AVX512_BF16, cpu_supports
from .shared_bias_attention import checked_bias

# a block's logits take at most this many bytes, unless a single query row,
# or a whole head of few queries over many keys, is larger
BLOCK_BYTES = 4 * 2**20

_FUSED = 'fused'
_BLOCKS = 'blocks'


class _HeldKernel(threading.local):
    """The kernel every attention of the current thread is held to
    (:func:`fused_kernel_only`, :func:`blocks_only`), or None for
    :func:`prefers_blocks`'s own choice: one per thread, so that a
    context held in one thread leaves the others' choice alone."""
    kernel: Optional[str] = None


_held_to = _HeldKernel()


@functools.lru_cache(maxsize=None)
def cpu_lacks_amx_for_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 with AVX512-BF16 but has no AMX
    tiles."""
    return cpu_supports(AVX512_BF16) and not cpu_supports(AMX_TILE)


@contextlib.contextmanager
def _held(kernel: str) -> Iterator[None]:
    """Within the context, :func:`prefers_blocks` chooses ``kernel``
    wherever the blocks can run, in the current thread."""
    before, _held_to.kernel = _held_to.kernel, kernel
    try:
        yield
    finally:
        _held_to.kernel = before


def fused_kernel_only() -> contextlib.AbstractContextManager:
    """A context within which every attention of the current thread runs
    the fused kernel."""
    return _held(_FUSED)


def blocks_only() -> contextlib.AbstractContextManager:
    """A context within which every attention of the current thread that
    the blocks can compute (CPU inference without dropout, not traced)
    runs them, in any precision and on any CPU: to measure them where they
    are not chosen."""
    return _held(_BLOCKS)


def prefers_blocks(query: Tensor, *others: Tensor, dropout: float) -> bool:
    """Whether :func:`blocked_attention` beats the fused kernel for an
    attention on ``query`` and ``others`` (keys, values, bias): bfloat16 on a
    CPU with AVX512-BF16 and no AMX, without dropout, autograd or a graph
    being traced (the blocks write into slices of the output); within
    :func:`fused_kernel_only` never, within :func:`blocks_only` in any
    precision."""
    tensors = (query, ) + others
    records_graph = torch.is_grad_enabled() and any(t.requires_grad
                                                    for t in tensors)
    can_run = (query.device.type == 'cpu' and not dropout
               and not records_graph and not torch.jit.is_tracing()
               and not torch.compiler.is_compiling())
    if not can_run:
        return False
    if _held_to.kernel is not None:
        return _held_to.kernel == _BLOCKS
    return query.dtype == torch.bfloat16 and cpu_lacks_amx_for_bfloat16()


def row_blocks(queries: int, keys: int,
               element_size: int) -> List[slice]:
    """Slices of the query rows of one head whose ``rows × keys`` logits
    take at most :data:`BLOCK_BYTES` (at least one row a block). An
    attention of few queries over many keys (the agents reading every
    token) is never split: every block would re-read all the keys and
    values."""
    if queries <= keys:
        return [slice(None)]
    rows = max(1, BLOCK_BYTES // (keys * element_size))
    return [slice(start, start + rows) for start in range(0, queries, rows)]


def blocked_attention(query: Tensor, key: Tensor, value: Tensor,
                      bias: Tensor, scale: float) -> Tensor:
    """``softmax(scale * q kᵀ + bias) v`` for ``(B, heads, *, d)`` inputs and
    a ``(heads, L, S)`` bias shared by the batch, one head and block of
    rows (:func:`row_blocks`) at a time; no autograd.

    Each block is a product of matrices (``addmm``, ``mm``), which read
    the heads' strided views in place, where batched products of several
    heads copied their operands first. Every block's logits are written
    into one buffer of the call and turned into weights in place, and each
    block's rows of the output are written where they belong: the output,
    ``(B, heads, L, d)``, is laid out as ``(B, L, heads, d)``, as the fused
    kernel lays out its output for queries split from tokens, so that
    merging its heads is a view, not a copy.

    Raises:
        ValueError: ``bias`` is not ``(heads, L, S)`` for ``query`` and
            ``key``.
    """
    batch, heads, queries, _ = query.shape
    keys = key.shape[2]
    bias = checked_bias(bias, query, key)
    out = query.new_empty(batch, queries, heads,
                          value.shape[-1]).transpose(1, 2)
    blocks = row_blocks(queries, keys, query.element_size())
    logits = query.new_empty(len(range(queries)[blocks[0]]), keys)
    for image in range(batch):
        for head in range(heads):
            keys_t = key[image, head].t()
            for rows in blocks:
                block_query = query[image, head, rows]
                block = logits[:len(block_query)]
                torch.addmm(bias[head, rows],
                            block_query,
                            keys_t,
                            alpha=scale,
                            out=block)
                torch.softmax(block, -1, out=block)
                torch.mm(block, value[image, head], out=out[image, head, rows])
    return out
