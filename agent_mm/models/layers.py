"""Small layers and tensor helpers shared by the agent models."""
import contextlib
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor

from .fused_linear import (Epilogue, activation_epilogue, fused_linear,
                           fuses_epilogues)
from .tracing import exporting, tracing


def biased_attention(query: Tensor,
                     key: Tensor,
                     value: Tensor,
                     bias: Tensor,
                     scale: float,
                     dropout: float = 0.) -> Tensor:
    """``softmax(scale * q kᵀ + bias) v`` on ``(B, heads, *, d)`` inputs by
    ``scaled_dot_product_attention``, the bias (broadcastable, at most 4-D)
    given as a 4-D mask in the query's dtype: with a mask of fewer
    dimensions CPU inference leaves the fused (flash) kernel for the
    unfused path, 2-3x slower. The kernel reads the mask row by row, so a
    row-major bias serves it best."""
    mask = bias.reshape((1, ) * (4 - bias.dim()) + tuple(bias.shape))
    return F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask.to(query.dtype),
        dropout_p=dropout,
        scale=scale)


def tokens_to_map(x: Tensor, hw_shape: Sequence[int]) -> Tensor:
    """``(B, H*W, C)`` tokens → ``(B, C, H, W)`` feature map.

    The result is a channels-last view; call ``.contiguous()`` before handing
    it to code that assumes NCHW memory (mmcv's C++ ops such as RoIAlign read
    channels-last input as garbage).
    """
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *hw_shape)


def tokens_to_nchw(x: Tensor, hw_shape: Sequence[int]) -> Tensor:
    """``(B, H*W, C)`` tokens → a contiguous (NCHW) ``(B, C, H, W)`` map, as
    the necks and mmcv's ops take it.

    Contiguous tokens are transposed one image at a time: PyTorch copies a
    transposed 2-D matrix with a blocked kernel about twice as fast at high
    resolution as its general strided copy of the 3-D transpose. A graph
    traced for export takes the plain copy (its loop would fix the batch
    size), and so does an empty batch (the loop would leave the result out
    of the autograd graph).
    """
    if exporting() or not x.is_contiguous() or not x.shape[0]:
        return tokens_to_map(x, hw_shape).contiguous()
    batch, tokens, channels = x.shape
    out = x.new_empty(batch, channels, tokens)
    for image in range(batch):
        out[image].copy_(x[image].t())
    return out.view(batch, channels, *hw_shape)


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """``(B, N, C)`` tokens → ``(B, heads, N, C / heads)`` (a view)."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """:func:`split_heads`'s inverse: ``(B, heads, N, d)`` → ``(B, N,
    heads * d)``."""
    return x.transpose(1, 2).flatten(2)


def map_to_tokens(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` feature map → ``(B, H*W, C)`` tokens (a view; free
    for a channels-last map)."""
    return x.flatten(2).transpose(1, 2)


class ChannelsLastConv2d(nn.Conv2d):
    """``nn.Conv2d`` computed in channels-last memory layout.

    Token maps (:func:`tokens_to_map`) are channels-last views. With the
    weight in the default layout, PyTorch's CPU convolution copies such an
    input to NCHW, computes, and the NCHW result must be copied again to
    become tokens: at high resolution these copies cost several times the
    convolution itself. A channels-last copy of the weight (tiny, made per
    call; gradients flow to the parameter as usual) keeps the whole
    convolution in that layout, and :func:`map_to_tokens` of its output is a
    contiguous view. ``Tensor.to`` is used because ``contiguous`` keeps the
    ambiguous NCHW strides of a depth-wise ``(C, 1, k, k)`` weight.
    Parameters and state dict are those of ``nn.Conv2d``.
    """

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.to(memory_format=torch.channels_last)
        return self._conv_forward(x, weight, self.bias)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_prob == 0.:
            return x
        keep = 1 - self.drop_prob
        shape = (x.shape[0], ) + (1, ) * (x.dim() - 1)
        mask = torch.empty(shape, dtype=x.dtype, device=x.device)
        return x * mask.bernoulli_(keep) / keep


def drop_path_or_identity(drop_prob: float) -> nn.Module:
    """A :class:`DropPath`, or identity when nothing is dropped."""
    return DropPath(drop_prob) if drop_prob > 0 else nn.Identity()


def build_activation(act_cfg: dict) -> nn.Module:
    """The activation of ``act_cfg`` (mmcv's builder)."""
    # imported on use: ``import agent_mm`` stays free of mmcv
    from mmcv.cnn import build_activation_layer
    return build_activation_layer(act_cfg)


def build_norm(norm_cfg: dict, dims: int) -> nn.Module:
    """The norm layer of ``norm_cfg`` (mmcv's builder) over ``dims``."""
    from mmcv.cnn import build_norm_layer
    return build_norm_layer(norm_cfg, dims)[1]


class Mlp(nn.Module):
    """``fc1 → activation → dropout → fc2 → dropout`` (released parameter
    names); the activation is GELU unless ``act_cfg`` (mmcv config) says
    otherwise."""

    def __init__(self,
                 in_features: int,
                 hidden_features: int,
                 drop: float = 0.,
                 act_cfg: Optional[dict] = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = build_activation(act_cfg or dict(type='GELU'))
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


def residual_sum(fresh: Tensor, other: Tensor, *makers: nn.Module) -> Tensor:
    """``fresh + other``, written into ``fresh`` when autograd is off and no
    forward hook can hold ``fresh``.

    Large activations are fresh pages from the kernel at every allocation
    (see :data:`MLP_CHUNK_BYTES`), so inference adds into a temporary (e.g.
    a branch's output) instead of allocating the sum, unless the sum would
    have another dtype or shape than ``fresh`` (as under autocast, where a
    bfloat16 branch meets a float32 residual), a graph is traced (for
    export, or by ``torch.compile``, which plans its own buffers), or a
    forward hook of ``makers`` or of their submodules (or a global one,
    :func:`calls_plain_forward`) may have kept ``fresh``: it would see the
    sum instead of what the module returned.

    Args:
        fresh: The temporary, e.g. a residual branch's output.
        other: What is added to it.
        makers: The modules whose output ``fresh`` is, or may share memory
            with (a mixer returns its projection's output, dropout in eval
            its input); none for a tensor that no module returned.
    """
    if (torch.is_grad_enabled() or tracing()
            or torch.result_type(fresh, other) != fresh.dtype
            or torch.broadcast_shapes(fresh.shape, other.shape) != fresh.shape
            or (makers and not calls_plain_forward(
                *(sub for maker in makers for sub in maker.modules())))):
        return fresh + other
    return fresh.add_(other)


# In inference the MLP residual runs over chunks of tokens whose hidden
# activations fill a buffer of about this many bytes, allocated once per
# call and reused by every chunk. The hidden layer is the largest activation
# of the backbones at high resolution; allocated per chunk, it would be
# fresh pages from the kernel at every chunk (glibc returns large freed
# blocks to the kernel), and writing fresh pages costs 3-5x a warm copy.
MLP_CHUNK_BYTES = 8 * 2**20


def mlp_residual(x: Tensor, norm: nn.Module, mlp: Mlp, drop_path: nn.Module,
                 training: bool) -> Tensor:
    """``x + drop_path(mlp(norm(x)))`` of the pre-norm blocks.

    When nothing is trained (``training`` False and autograd off), the
    norm and the MLP act on each token alone and ``drop_path`` is the
    identity, so the sum is accumulated into ``x`` in place, a chunk of
    tokens at a time (:func:`add_mlp_in_chunks`): the full-size hidden
    layer never exists. Nothing else may hold ``x``: pass the sum of
    :func:`residual_sum`, fresh or added into a branch's output that no
    forward hook can have kept. A traced graph (export,
    ``torch.compile``) takes the plain sum: the loop's length depends on
    the input size, and a compiler plans the buffers itself.

    Args:
        x: ``(..., C)`` tokens.
        norm: Per-token norm before the MLP.
        mlp: The block's :class:`Mlp`.
        drop_path: Stochastic depth on the residual branch.
        training: The block's training flag.
    """
    if (training or torch.is_grad_enabled() or tracing()
            or not runs_in_chunks(norm, mlp, drop_path)):
        return x + drop_path(mlp(norm(x)))
    x = x.contiguous()
    add_mlp_in_chunks(x.view(-1, x.shape[-1]), norm, mlp)
    return x


def runs_in_chunks(norm: nn.Module, mlp: nn.Module,
                   drop_path: nn.Module) -> bool:
    """Whether :func:`add_mlp_in_chunks` computes what calling the modules
    would: ``mlp`` is an :class:`Mlp` of plain linear layers
    (:func:`is_plain_linear`), and no module involved has forward hooks,
    which would see chunks or no call at all."""
    return (type(mlp) is Mlp and is_plain_linear(mlp.fc1)
            and is_plain_linear(mlp.fc2)
            and calls_plain_forward(norm, drop_path, *mlp.modules()))


def is_plain_linear(layer: nn.Module) -> bool:
    """Whether ``layer`` is an ``nn.Linear`` whose parameters are plain
    ``nn.Parameter`` tensors, so that its output is ``F.linear`` of its
    weight and bias (not of a quantized or parametrized layer, nor of a
    tensor subclass that computes its own product)."""
    return type(layer) is nn.Linear and all(
        param is None or type(param) is nn.Parameter
        for param in (layer.weight, layer.bias))


def calls_plain_forward(*modules: nn.Module) -> bool:
    """Whether calling each of ``modules`` runs its ``forward`` alone: no
    forward hooks or pre-hooks, of its own or global (feature extractors,
    pruning masks, observers). The inference shortcuts that read a layer's
    weights instead of calling it, or call it on chunks, are taken only
    then."""
    if (nn.modules.module._global_forward_hooks
            or nn.modules.module._global_forward_pre_hooks):
        return False
    return not any(module._forward_hooks or module._forward_pre_hooks
                   for module in modules)


def add_mlp_in_chunks(tokens: Tensor, norm: nn.Module, mlp: Mlp) -> None:
    """``tokens += mlp(norm(tokens))`` for ``(N, C)`` tokens in inference,
    in chunks of :data:`MLP_CHUNK_BYTES` of hidden activations.

    The products run in the compute dtype of the running autocast (as
    ``nn.Linear`` would compute under it, :func:`linear_into`): with the
    bias and activation in their epilogue where
    :func:`~.fused_linear.fuses_epilogues` says so, else written into two
    buffers reused by every chunk, the activation applied in place where
    :func:`activate_` knows how.
    """
    dtype = compute_dtype(tokens)
    # cast once for all chunks (linear_into's casts are then no-ops)
    fc1, fc2 = ((layer.weight.to(dtype),
                 None if layer.bias is None else layer.bias.to(dtype))
                for layer in (mlp.fc1, mlp.fc2))
    rows = max(1, MLP_CHUNK_BYTES // (len(fc1[0]) * dtype.itemsize))
    rows = min(rows, len(tokens))
    epilogue = activation_epilogue(mlp.act)
    if epilogue is not None and fuses_epilogues(dtype, tokens.device,
                                                tokens.shape[-1]):
        branch = _fused_mlp(fc1, fc2, epilogue, dtype)
    else:
        branch = _buffered_mlp(fc1, fc2, mlp.act, tokens.new_empty(
            rows, len(fc1[0]), dtype=dtype))
    for part in tokens.split(rows):
        part.add_(branch(norm(part)))


Layer = Tuple[Tensor, Optional[Tensor]]


def _fused_mlp(fc1: Layer, fc2: Layer, epilogue: Epilogue,
               dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """The MLP of a chunk of tokens by two :func:`~.fused_linear.fused_linear`
    products, the activation in the first one's epilogue."""

    def branch(x: Tensor) -> Tensor:
        return fused_linear(fused_linear(x.to(dtype), *fc1, epilogue), *fc2)

    return branch


def _buffered_mlp(fc1: Layer, fc2: Layer, act: nn.Module,
                  hidden: Tensor) -> Callable[[Tensor], Tensor]:
    """The MLP of a chunk of at most ``len(hidden)`` tokens, written into
    ``hidden`` and an output buffer reused by every chunk."""
    out = hidden.new_empty(len(hidden), len(fc2[0]))

    def branch(x: Tensor) -> Tensor:
        size = len(x)
        linear_into(hidden[:size], x, *fc1)
        activate_(act, hidden[:size])
        return linear_into(out[:size], hidden[:size], *fc2)

    return branch


@contextlib.contextmanager
def plain_tensors() -> Iterator[None]:
    """Make tensors as plain tensors without autograd history, also within
    ``torch.inference_mode()``: for tensors kept across forwards (caches),
    since a cached inference tensor breaks any later forward that autograd
    records ("Inference tensors cannot be saved for backward")."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def round_up(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple``."""
    return -(-value // multiple) * multiple


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype ``nn.Linear`` computes in for input ``x``: the autocast
    dtype of ``x``'s device where autocast is on, else ``x``'s own."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def linear_into(out: Tensor, x: Tensor, weight: Tensor,
                bias: Optional[Tensor]) -> Tensor:
    """``F.linear(x, weight, bias)`` of 2-D ``x``, written into ``out`` and
    computed in its dtype (the operands cast to it, as autocast casts
    them); without autograd (``out=`` products have no gradient)."""
    dtype = out.dtype
    x, weight = x.to(dtype), weight.to(dtype).t()
    if bias is None:
        return torch.mm(x, weight, out=out)
    return torch.addmm(bias.to(dtype), x, weight, out=out)


def activate_(act: nn.Module, x: Tensor) -> Tensor:
    """Apply the activation module ``act`` to ``x`` in place: GELU and ReLU
    by their in-place kernels, any other activation through a copy."""
    if type(act) is nn.GELU:
        return torch.ops.aten.gelu_(x, approximate=act.approximate)
    if type(act) is nn.ReLU:
        return x.relu_()
    return x.copy_(act(x))


def freeze(modules: Iterable[Optional[nn.Module]] = (),
           params: Iterable[Optional[nn.Parameter]] = ()) -> None:
    """Put modules in eval mode and stop gradients to them and to params."""
    for module in modules:
        if module is None:
            continue
        module.eval()
        for param in module.parameters():
            param.requires_grad = False
    for param in params:
        if param is not None:
            param.requires_grad = False


def maybe_checkpoint(fn: Callable[..., Tensor], x: Tensor, *args: Any,
                     enabled: bool) -> Tensor:
    """Call ``fn(x, *args)``, with gradient checkpointing when enabled and
    gradients are needed."""
    if enabled and x.requires_grad:
        return cp.checkpoint(fn, x, *args, use_reentrant=False)
    return fn(x, *args)


def linear_drop_path_rates(depths: Sequence[int],
                           drop_path_rate: float) -> list:
    """Stochastic depth rates rising linearly from 0 over all blocks, split
    per stage."""
    total = sum(depths)
    rates = [
        drop_path_rate * i / (total - 1) if total > 1 else 0.
        for i in range(total)
    ]
    splits, start = [], 0
    for depth in depths:
        splits.append(rates[start:start + depth])
        start += depth
    return splits
