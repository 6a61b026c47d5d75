"""Softmax attention with a learned bias shared by every image of the batch,
trained without storing the attention map, and the bias only where it is
small.

Agent attention's biases depend on the token grid, not on the image, so one
``(heads, L, S)`` map serves the whole batch, and it is built from a few
small parameters. PyTorch's fused CPU kernel cannot return a gradient for
an additive mask, so with trainable biases ``scaled_dot_product_attention``
falls back to its unfused path, which keeps the bias and two
attention-sized tensors per call for the backward pass. Here the forward
runs the fused kernel and keeps its inputs, its output and the row-wise
log-sum-exp; the backward rebuilds the attention weights (one extra
``L×S×d`` product) and sums the bias gradient over the batch.

The bias itself is kept for the backward pass when it is no larger than
the query or the key, which are kept anyway (:func:`keeps_bias`: few
agents, or a batch of several images): the memory stays of the order of
what the call already holds, and the backward pass skips rebuilding it
(about a hundred small operations per call). A larger bias (many agents,
as in the paper's detection configs at batch 2) is rebuilt in backward
from its small sources.
"""
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

BiasFn = Callable[..., Tensor]

# On the CPU the backward pass works on blocks of query rows whose
# attention-sized temporaries stay within this many bytes: blocks this small
# are reused from the allocator's heap and stay in the caches, while a
# full-size map is fresh pages from the kernel at every call.
BACKWARD_BLOCK_BYTES = 4 * 2**20

# PyTorch's fused (flash) CPU kernel; unlike the public function it also
# returns the log-sum-exp of each row of logits. Absent from some builds.
_FLASH_CPU = getattr(torch.ops.aten,
                     '_scaled_dot_product_flash_attention_for_cpu', None)


_HALF_DTYPES = (torch.bfloat16, torch.float16)

# The columns that carry float32 terms into a half-precision product
# (:func:`_widened`): as many as reach float32's precision in bfloat16
# (3 × 8 bits), each within this size (float16 holds at most 65504).
_TERM_COLUMNS = 3
_COLUMN_LIMIT = 2.0**14


def _logits(query: Tensor, key: Tensor, bias: Tensor, scale: float) -> Tensor:
    """``scale * q kᵀ + bias`` of shape ``(B, heads, L, S)``."""
    return torch.matmul(query * scale, key.transpose(-2, -1)).add_(bias)


def _attend_with_lse(query: Tensor, key: Tensor, value: Tensor, bias: Tensor,
                     scale: float) -> Tuple[Tensor, Tensor]:
    """The attention output and the log-sum-exp ``(B, heads, L)`` of each
    row of logits (float32 for half-precision inputs); through the fused
    kernel on the CPU (it needs one head size for queries, keys and
    values)."""
    if (query.device.type == 'cpu' and _FLASH_CPU is not None
            and value.shape[-1] == query.shape[-1]):
        return _FLASH_CPU(
            query, key, value, attn_mask=bias.unsqueeze(0), scale=scale)
    if query.dtype not in _HALF_DTYPES:
        logits = _logits(query, key, bias, scale)
        lse = torch.logsumexp(logits, dim=-1)
        weights = logits.sub_(lse.unsqueeze(-1)).exp_()
        return torch.matmul(weights, value), lse
    # the rows' peaks from logits rounded to the inputs' dtype (within a
    # 256th of their size), corrected by the largest logit less them
    # (rounded near zero: to a 256th of that), then the weights relative
    # to them, as the backward pass rebuilds them (:func:`_weight_blocks`),
    # summed in float32
    whole = slice(None)
    peak = _logits(query, key, bias, scale).amax(dim=-1).float()
    peak += _shifted_blocks(query, key, bias, scale,
                            peak)(whole, whole).amax(dim=-1)
    weights = _weight_blocks(query, key, bias, scale, peak)(whole, whole)
    total = weights.sum(dim=-1, dtype=torch.float32)
    out = torch.matmul(weights, value).div_(total.unsqueeze(-1))
    return out, peak + total.log()


BlockFn = Callable[[slice, slice], Tensor]


def _weight_blocks(query: Tensor, key: Tensor, bias: Tensor, scale: float,
                   lse: Tensor) -> BlockFn:
    """A function of ``(rows, cols)`` giving that block of the attention
    weights ``exp(scale * q kᵀ + bias - lse)`` in the inputs' dtype, for a
    float32 (or wider) ``lse`` of shape ``(B, heads, L)``: the exponential
    of :func:`_shifted_blocks`."""
    shifted_block = _shifted_blocks(query, key, bias, scale, lse)
    return lambda rows, cols: shifted_block(rows, cols).exp_()


def _shifted_blocks(query: Tensor, key: Tensor, bias: Tensor, scale: float,
                    shift: Tensor) -> BlockFn:
    """A function of ``(rows, cols)`` giving that block of the logits less
    a float32 (or wider) ``shift`` of shape ``(B, heads, L)``,
    ``scale * q kᵀ + bias - shift``, in the inputs' dtype.

    In bfloat16 or float16 ``shift`` is subtracted within the product,
    which accumulates in float32 and rounds once: more columns of the query
    carry ``-shift / scale`` against as many of the key (:func:`_widened`),
    added once for all blocks. So only logits less ``shift`` are rounded,
    small near each row's log-sum-exp or peak, however large the logits
    themselves: trained logits reach thousands (2320 in the segmentation
    quick-start's last stage, where bfloat16 steps by 16), and weights
    rebuilt from rounded logits were off from the forward pass's by
    factors up to millions, and so were the gradients.
    """
    if query.dtype not in _HALF_DTYPES:
        return lambda rows, cols: _logits(
            query[:, :, rows], key[:, :, cols], bias[:, rows, cols],
            scale).sub_(shift[:, :, rows, None])
    wide_query, wide_key = _widened(query, key,
                                    shift.float().div(-scale).unsqueeze(-1))

    def block(rows: slice, cols: slice) -> Tensor:
        block_query, block_key = wide_query[:, :, rows], wide_key[:, :, cols]
        shifted = block_query.new_empty(*block_query.shape[:3],
                                        block_key.shape[2])
        # the bias for every image, then one product over images and heads
        # (a product per image cost 4-6 % of Agent-PVT-T's bfloat16 forward
        # and backward at batch 8, in operations more than in arithmetic)
        shifted.copy_(bias[:, rows, cols])
        _as_batch_of_matrices(shifted).baddbmm_(
            _as_batch_of_matrices(block_query),
            _as_batch_of_matrices(block_key).transpose(-2, -1),
            alpha=scale)
        return shifted

    return block


def _widened(left: Tensor, right: Tensor,
             terms: Tensor) -> Tuple[Tensor, Tensor]:
    """``left`` ``(B, heads, L, k)`` and ``right`` ``(B, heads, S, k)`` in
    half precision, each with :data:`_TERM_COLUMNS` more columns, such that
    ``left' right'ᵀ = left rightᵀ + terms`` for float32 ``terms``
    ``(B, heads, L, 1)``: a product accumulating in float32 adds them before
    it rounds, once.

    ``left``'s columns are the rounding of ``terms``, the rounding of the
    rest, and so on (about 2^-24 of their size in bfloat16); ``right``'s
    hold ones, or a power of two where float16 would overflow
    (:func:`_column_unit`): powers of two only move exponents.
    """
    unit = _column_unit(terms)
    columns, rest = [], terms / unit
    for _ in range(_TERM_COLUMNS):
        columns.append(rest.to(left.dtype))
        rest = rest - columns[-1]
    units = unit.to(right.dtype).expand(*right.shape[:-1], _TERM_COLUMNS)
    return (torch.cat([left, *columns], dim=-1),
            torch.cat([right, units], dim=-1))


def _column_unit(terms: Tensor) -> Tensor:
    """1, or the power of two that brings the largest of ``terms`` within
    :data:`_COLUMN_LIMIT` (float16 holds at most 65504; bfloat16 has
    float32's range), as a float32 scalar tensor: a GPU need not wait for
    it."""
    if not terms.numel():
        return terms.new_ones((), dtype=torch.float32)
    ratio = terms.abs().amax().float() / _COLUMN_LIMIT
    return torch.exp2(torch.ceil(torch.log2(ratio.clamp(min=1.))))


def backward_blocks(query: Tensor, key: Tensor) -> List[Tuple[slice, slice]]:
    """``(rows, cols)`` blocks of the ``L×S`` attention map for the backward
    pass, split along its longer axis (queries, or keys when there are more
    keys) so that, on the CPU, each block's ``(B, heads, rows, cols)``
    temporaries stay within :data:`BACKWARD_BLOCK_BYTES`. Splitting the
    longer axis keeps the products' shared dimension long: blocks of a few
    agent rows over many keys would re-read and re-write the whole key and
    value gradients once per block."""
    batch, heads, queries = query.shape[:3]
    keys = key.shape[2]
    length, other = max(queries, keys), min(queries, keys)
    size = length
    if query.device.type == 'cpu':
        line_bytes = batch * heads * other * query.element_size()
        size = max(1, BACKWARD_BLOCK_BYTES // max(1, line_bytes))
    parts = [slice(start, start + size) for start in range(0, length, size)]
    whole = slice(None)
    if keys > queries:
        return [(whole, cols) for cols in parts]
    return [(rows, whole) for rows in parts]


def _as_batch_of_matrices(x: Tensor) -> Tensor:
    """``(B, heads, m, k)`` as ``(B*heads, m, k)`` (a view when possible)."""
    return x.reshape(-1, *x.shape[-2:])


def autocast_state(device_type: str) -> dict:
    """The arguments of ``torch.autocast`` that restore the current autocast
    state of ``device_type`` (the backward pass runs outside the forward's
    ``autocast`` context)."""
    return dict(
        device_type=device_type,
        dtype=torch.get_autocast_dtype(device_type),
        enabled=torch.is_autocast_enabled(device_type))


def sum_over_batch(x: Tensor, out: Tensor) -> None:
    """``out = x.sum(dim=0)`` as elementwise additions (PyTorch's reduction
    over the outermost dimension is several times slower); zeros for an
    empty batch."""
    if not len(x):
        out.zero_()
        return
    out.copy_(x[0])
    for item in x[1:]:
        out.add_(item)


def checked_bias(bias: Tensor, query: Tensor, key: Tensor) -> Tensor:
    """``bias`` in the query's dtype if it is ``(heads, L, S)`` for
    ``query`` and ``key``, else a ``ValueError`` naming the expected shape
    (a wrong shape could broadcast silently)."""
    expected = (query.shape[1], query.shape[2], key.shape[2])
    if tuple(bias.shape) != expected:
        raise ValueError(f'bias must have shape (heads, L, S) = {expected}, '
                         f'got {tuple(bias.shape)}')
    return bias.to(query.dtype)


def keeps_bias(query: Tensor, key: Tensor) -> bool:
    """Whether :func:`shared_bias_attention` keeps the ``(heads, L, S)``
    bias for the backward pass instead of rebuilding it: when it has no
    more elements than the larger of ``query`` ``(B, heads, L, d)`` and
    ``key`` ``(B, heads, S, d)``, both of which are kept anyway."""
    heads, queries = query.shape[1:3]
    bias_size = heads * queries * key.shape[2]
    return bias_size <= max(query.numel(), key.numel())


def _attend_and_save(ctx, query: Tensor, key: Tensor, value: Tensor,
                     scale: float, bias: Tensor, *kept: Tensor) -> Tensor:
    """The forward of both autograd functions: attend with ``bias``
    (:func:`checked_bias`) and save the inputs, the output, the
    log-sum-exp and ``kept`` (the bias, or its sources) for the backward
    pass."""
    out, lse = _attend_with_lse(query, key, value, bias, scale)
    ctx.save_for_backward(query, key, value, out, lse, *kept)
    ctx.scale = scale
    return out


class _KeptBiasAttention(torch.autograd.Function):
    """``softmax(scale * q kᵀ + bias) v`` keeping ``bias``, built by the
    caller with autograd, for the backward pass; see
    :func:`shared_bias_attention`."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, scale: float,
                bias: Tensor) -> Tensor:
        # kept in the query's dtype: cast once, not again in backward
        ctx.bias_dtype = bias.dtype
        bias = checked_bias(bias, query, key)
        return _attend_and_save(ctx, query, key, value, scale, bias, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> Tuple[Optional[Tensor], ...]:
        query, key, value, out, lse, bias = ctx.saved_tensors
        need_query, need_key, need_value, _, need_bias = ctx.needs_input_grad
        grad_query, grad_key, grad_value, grad_bias = _blockwise_grads(
            ctx.scale, query, key, value, out, lse, bias, grad_out,
            (need_query, need_key, need_value, need_bias))
        if grad_bias is not None:
            grad_bias = grad_bias.to(ctx.bias_dtype)
        return grad_query, grad_key, grad_value, None, grad_bias


class _SharedBiasAttention(torch.autograd.Function):
    """``softmax(scale * q kᵀ + make_bias(*sources)) v`` keeping only the
    bias sources, the bias rebuilt in backward; see
    :func:`shared_bias_attention`."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, scale: float,
                make_bias: BiasFn, *sources: Tensor) -> Tensor:
        ctx.make_bias = make_bias
        ctx.autocast = autocast_state(query.device.type)
        return _attend_and_save(
            ctx, query, key, value, scale,
            checked_bias(make_bias(*sources), query, key), *sources)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> Tuple[Optional[Tensor], ...]:
        query, key, value, out, lse, *sources = ctx.saved_tensors
        need_query, need_key, need_value, _, _, *need_sources = (
            ctx.needs_input_grad)
        # the bias is rebuilt as in forward: in its dtype, without a cast of
        # the full map
        with torch.enable_grad(), torch.autocast(**ctx.autocast):
            sources = [
                src.detach().requires_grad_(need)
                for src, need in zip(sources, need_sources)
            ]
            bias = ctx.make_bias(*sources)
        grad_query, grad_key, grad_value, grad_bias = _blockwise_grads(
            ctx.scale, query, key, value, out, lse,
            bias.detach().to(query.dtype), grad_out,
            (need_query, need_key, need_value, bias.requires_grad))
        grad_sources = [None] * len(sources)
        if grad_bias is not None:
            wanted = [i for i, need in enumerate(need_sources) if need]
            with torch.autocast(**ctx.autocast):
                found = torch.autograd.grad(bias, [sources[i] for i in wanted],
                                            grad_bias.to(bias.dtype))
            for i, grad in zip(wanted, found):
                grad_sources[i] = grad
        return (grad_query, grad_key, grad_value, None, None, *grad_sources)


def _accumulate(grad: Optional[Tensor], part: slice, left: Tensor,
                right: Tensor) -> None:
    """``grad[:, :, part] += left @ right`` over ``(B, heads)`` batches."""
    if grad is not None:
        target = grad[:, :, part]
        # a view (not reshape): the sum must land in ``grad``
        target.view(-1, *target.shape[-2:]).baddbmm_(
            _as_batch_of_matrices(left), _as_batch_of_matrices(right))


def _product_blocks(left: Tensor, right: Tensor) -> BlockFn:
    """A function of ``(rows, cols)`` giving that block of ``left rightᵀ``
    for ``(B, heads, *, k)`` operands."""
    return lambda rows, cols: torch.matmul(left[:, :, rows],
                                           right[:, :, cols].transpose(-2, -1))


def _centred_grad_blocks(grad_out: Tensor, value: Tensor,
                         row_dot: Tensor) -> BlockFn:
    """A function of ``(rows, cols)`` giving that block of ``dO vᵀ -
    row_dot``, whose product with the weights is the gradient of the
    logits, ``w * (g - rowsum(w * g))`` with ``g = dO vᵀ``; the row sums
    equal ``rowsum(dO * out)``, float32 ``row_dot`` ``(B, heads, L, 1)``.

    In half precision ``row_dot`` is subtracted within the product
    (:func:`_widened`): subtracted from a rounded product, it was taken
    through a float32 copy of each block and rounded twice.
    """
    if grad_out.dtype in _HALF_DTYPES:
        return _product_blocks(*_widened(grad_out, value, -row_dot))
    product_block = _product_blocks(grad_out, value)
    return lambda rows, cols: product_block(rows, cols).sub_(
        row_dot[:, :, rows])


def _blockwise_grads(
        scale: float, query: Tensor, key: Tensor, value: Tensor, out: Tensor,
        lse: Tensor, bias: Tensor, grad_out: Tensor,
        needed: Tuple[bool, bool, bool, bool]) -> Tuple[Optional[Tensor], ...]:
    """Gradients of query, key, value and the (batch-summed) bias, each
    ``None`` unless ``needed``, rebuilding the attention weights from the
    log-sum-exp one block of the map at a time (:func:`backward_blocks`); the
    gradients are accumulated in place over the blocks."""
    need_query, need_key, need_value, need_bias = needed
    # contiguous: accumulated through (B*heads, n, d) views
    dense = torch.contiguous_format
    grad_query, grad_key, grad_value = (torch.zeros_like(
        x, memory_format=dense) if need else None
                                        for x, need in ((query, need_query),
                                                        (key, need_key),
                                                        (value, need_value)))
    grad_bias = torch.empty_like(bias) if need_bias else None
    # the row sums in float32: rounded, they would shift a whole row of
    # logit gradients; a block takes its float32 rows in place
    compute = torch.promote_types(query.dtype, torch.float32)
    row_dot = (grad_out.to(compute) * out.to(compute)).sum(
        dim=-1, keepdim=True)
    weight_block = _weight_blocks(query, key, bias, scale, lse)
    centred_block = _centred_grad_blocks(grad_out, value, row_dot)
    for rows, cols in backward_blocks(query, key):
        block_query, block_grad = query[:, :, rows], grad_out[:, :, rows]
        block_key = key[:, :, cols]
        weights = weight_block(rows, cols)
        _accumulate(grad_value, cols, weights.transpose(-2, -1), block_grad)
        grad_logits = centred_block(rows, cols).mul_(weights)
        del weights
        if grad_bias is not None:
            sum_over_batch(grad_logits, grad_bias[:, rows, cols])
        _accumulate(grad_query, rows, grad_logits, block_key)
        _accumulate(grad_key, cols, grad_logits.transpose(-2, -1), block_query)
    for grad in (grad_query, grad_key):
        if grad is not None:
            grad.mul_(scale)
    return grad_query, grad_key, grad_value, grad_bias


def shared_bias_attention(query: Tensor, key: Tensor, value: Tensor,
                          scale: float, make_bias: BiasFn, *sources:
                          Tensor) -> Tensor:
    """``softmax(scale * q kᵀ + bias) v`` with ``bias = make_bias(*sources)``
    shared by the batch, storing no attention map, and the bias only when
    :func:`keeps_bias` says so.

    Args:
        query: ``(B, heads, L, d)``.
        key: ``(B, heads, S, d)``.
        value: ``(B, heads, S, e)``.
        scale: Factor of the dot products.
        make_bias: Builds the ``(heads, L, S)`` bias from ``sources`` with
            differentiable torch operations; called once in forward, and
            once more in backward unless the bias is kept.
        sources: The tensors the bias is built from (usually a few small
            parameters).

    Returns:
        ``(B, heads, L, e)``.
    """
    if keeps_bias(query, key):
        return _KeptBiasAttention.apply(query, key, value, scale,
                                        make_bias(*sources))
    return _SharedBiasAttention.apply(query, key, value, scale, make_bias,
                                      *sources)
