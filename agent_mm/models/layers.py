"""Building blocks shared by the agent backbones."""
import copy
import math
import numbers
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from torch import Tensor


def tokens_to_map(x: Tensor, hw_shape: Sequence[int]) -> Tensor:
    """``(B, H*W, C)`` tokens → ``(B, C, H, W)`` feature map.

    The result is a channels-last view; call ``.contiguous()`` before handing
    it to code that assumes NCHW memory (mmcv's C++ ops such as RoIAlign read
    channels-last input as garbage).
    """
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *hw_shape)


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


class Mlp(nn.Module):
    """``fc1 → GELU → dropout → fc2 → dropout`` (released parameter names)."""

    def __init__(self, in_features: int, hidden_features: int,
                 drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


def residual_sum(fresh: Tensor, other: Tensor) -> Tensor:
    """``fresh + other``, written into ``fresh`` when autograd is off.

    Large activations are fresh pages from the kernel at every allocation
    (see :data:`MLP_CHUNK_BYTES`), so inference adds into a temporary the
    caller owns (e.g. a branch's output) instead of allocating the sum,
    unless the sum would have another dtype or shape than ``fresh`` (as
    under autocast, where a bfloat16 branch meets a float32 residual).
    """
    if (torch.is_grad_enabled()
            or torch.result_type(fresh, other) != fresh.dtype
            or torch.broadcast_shapes(fresh.shape,
                                      other.shape) != fresh.shape):
        return fresh + other
    return fresh.add_(other)


# In inference the MLP residual runs over chunks of tokens whose hidden
# activations stay within this many bytes. The hidden layer is the largest
# activation of the backbones at high resolution, and an allocation this
# large would be fresh pages from the kernel at every call (glibc maps
# anything over 32 MB afresh and unmaps it on free).
MLP_CHUNK_BYTES = 16 * 2**20


def mlp_residual(x: Tensor, norm: nn.Module, mlp: Mlp, drop_path: nn.Module,
                 training: bool) -> Tensor:
    """``x + drop_path(mlp(norm(x)))`` of the pre-norm blocks.

    When nothing is trained (``training`` False and autograd off), the
    norm and the MLP act on each token alone and ``drop_path`` is the
    identity, so the sum is accumulated into ``x`` in place, a chunk of
    tokens at a time (:data:`MLP_CHUNK_BYTES`): the full-size hidden layer
    never exists. The caller must own ``x`` (a fresh residual sum).

    Args:
        x: ``(..., C)`` tokens.
        norm: Per-token norm before the MLP.
        mlp: The block's :class:`Mlp`.
        drop_path: Stochastic depth on the residual branch.
        training: The block's training flag.
    """
    if training or torch.is_grad_enabled():
        return x + drop_path(mlp(norm(x)))
    x = x.contiguous()
    hidden_bytes = mlp.fc1.out_features * x.element_size()
    for part in x.view(-1, x.shape[-1]).split(
            max(1, MLP_CHUNK_BYTES // hidden_bytes)):
        part.add_(mlp(norm(part)))
    return x


def resolve_arch(backbone: str, arch_zoo: Dict[str, dict], arch: Any,
                 overrides: Dict[str, Any]) -> Dict[str, Any]:
    """Settings of a named (or fully given) architecture, with overrides.

    Args:
        backbone: Class name, for error messages.
        arch_zoo: Named architectures, each a complete settings dict.
        arch: A name from ``arch_zoo`` or a dict of all settings.
        overrides: Keyword overrides; ``None`` values are ignored.

    Raises:
        ValueError: Unknown name, or a dict lacking settings.
    """
    required = set(next(iter(arch_zoo.values())))
    if isinstance(arch, str):
        if arch not in arch_zoo:
            raise ValueError(f'Unknown {backbone} arch {arch!r}; valid '
                             f'names: {sorted(arch_zoo)}, or a dict with '
                             f'the keys {sorted(required)}.')
        settings = copy.deepcopy(arch_zoo[arch])
    elif isinstance(arch, dict):
        missing = required - set(arch)
        if missing:
            raise ValueError(f'A custom {backbone} arch must set '
                             f'{sorted(required)}; missing {sorted(missing)}.')
        settings = copy.deepcopy(arch)
    else:
        raise ValueError(f'{backbone} arch must be a name in '
                         f'{sorted(arch_zoo)} or a dict, got {arch!r}.')
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


def _is_int(value: Any) -> bool:
    """An integer, but not a bool (which Python counts as one)."""
    return (isinstance(value, numbers.Integral)
            and not isinstance(value, bool))


def _is_real(value: Any) -> bool:
    """A real number, but not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _setting_error(owner: str, name: str, value: Any, allowed: str,
                   fix: str) -> ValueError:
    """The error for a bad setting: which, its value, what is allowed and
    how to fix it."""
    return ValueError(f'{owner}: {name} must be {allowed}, got {value!r}. '
                      f'{fix}')


def check_int_range(owner: str,
                    name: str,
                    value: Any,
                    low: int,
                    high: Optional[int] = None,
                    *,
                    fix: str) -> None:
    """Raise a ``ValueError`` unless ``value`` is an int in ``low..high``.

    Args:
        owner: Class name, for the message.
        name: Argument name, for the message.
        value: The value given.
        low: Smallest allowed value.
        high: Largest allowed value; None for no bound.
        fix: How to choose a valid value, for the message.
    """
    if _is_int(value) and low <= value and (high is None or value <= high):
        return
    allowed = (f'an int >= {low}'
               if high is None else f'an int in {low}..{high}')
    raise _setting_error(owner, name, value, allowed, fix)


def check_probability(owner: str, name: str, value: Any, fix: str) -> None:
    """Raise a ``ValueError`` unless ``value`` is a number in [0, 1)
    (a dropout or drop-path rate)."""
    if not (_is_real(value) and 0 <= value < 1):
        raise _setting_error(owner, name, value, 'a number in [0, 1)', fix)


def check_positive(owner: str, name: str, value: Any, fix: str) -> None:
    """Raise a ``ValueError`` unless ``value`` is a finite number > 0."""
    if not (_is_real(value) and 0 < value < math.inf):
        raise _setting_error(owner, name, value, 'a finite number > 0', fix)


def check_agent_num(owner: str, name: str, value: Any) -> None:
    """Raise a ``ValueError`` unless ``value`` is a square int >= 1 (the
    agents' bias grid is ``p×p``)."""
    if not (_is_int(value) and value >= 1 and math.isqrt(value)**2 == value):
        raise _setting_error(owner, name, value,
                             'a square number >= 1 (p*p agents)',
                             'Use e.g. 9, 16 or 49.')


def check_int_pair(owner: str, name: str, value: Any, fix: str) -> None:
    """Raise a ``ValueError`` unless ``value`` is two ints >= 1 (a grid
    ``(h, w)``)."""
    if not (isinstance(value, Sequence) and len(value) == 2
            and all(_is_int(side) and side >= 1 for side in value)):
        raise _setting_error(owner, name, value, 'a pair of ints >= 1', fix)


def check_agent_shape(owner: str, name: str, value: Any) -> None:
    """Raise a ``ValueError`` unless ``value`` is an agent grid
    ``(a_h, a_w)`` of ints >= 1."""
    check_int_pair(owner, name, value,
                   'Give the agent grid as (a_h, a_w), e.g. (7, 7).')


def check_num_heads(owner: str, name: str, num_heads: Any,
                    channels: int) -> None:
    """Raise a ``ValueError`` unless ``num_heads`` is an int >= 1 dividing
    ``channels``."""
    if not (_is_int(num_heads) and num_heads >= 1
            and channels % num_heads == 0):
        divisors = [d for d in range(1, channels + 1) if channels % d == 0]
        raise _setting_error(
            owner, name, num_heads,
            f'an int >= 1 by which the {channels} channels are divisible',
            f'Use one of {divisors}.')


def check_stage_heads(owner: str, channels: Sequence[int],
                      num_heads: Sequence[Any]) -> None:
    """:func:`check_num_heads` for every stage."""
    for stage, (dims, heads) in enumerate(zip(channels, num_heads)):
        check_num_heads(owner, f'num_heads[{stage}]', heads, dims)


def check_backbone_settings(owner: str, in_channels: Any, drop_rate: Any,
                            attn_drop_rate: Any, drop_path_rate: Any) -> None:
    """Raise a ``ValueError`` unless a backbone's image channels are >= 1
    and its dropout and stochastic depth rates are in [0, 1)."""
    check_int_range(
        owner, 'in_channels', in_channels, 1, fix='Use 3 for RGB images.')
    check_probability(owner, 'drop_rate', drop_rate,
                      '0 (as released) turns dropout off.')
    check_probability(owner, 'attn_drop_rate', attn_drop_rate,
                      '0 (as released) turns attention dropout off.')
    check_probability(
        owner, 'drop_path_rate', drop_path_rate,
        'A rate of 1 drops every residual branch of the last block and '
        'divides by 0 (NaN in training); the released configs use 0.1 to '
        '0.5, 0 turns stochastic depth off.')


# Per-stage settings: the check of each entry and its keyword arguments.
STAGE_RULES: Dict[str, Tuple[Callable[..., None], Dict[str, Any]]] = {
    'depths': (check_int_range,
               dict(low=1, fix='Every stage needs at least one block.')),
    'embed_dims':
    (check_int_range, dict(low=1, fix='The released models use 64 to 512.')),
    'num_heads':
    (check_int_range, dict(low=1, fix='Every stage needs at least one head.')),
    'mlp_ratios': (check_positive,
                   dict(fix='The released models use 8, 8, 4, 4.')),
    'sr_ratios': (check_int_range,
                  dict(low=1, fix='1 keeps keys at full resolution.')),
    'agent_num': (check_agent_num, {}),
    'agent_shapes': (check_agent_shape, {}),
}


def check_stage_lists(backbone: str, num_stages: int,
                      settings: Dict[str, Any],
                      names: Iterable[str]) -> None:
    """Raise a ``ValueError`` unless each named setting has one valid entry
    per stage (see :data:`STAGE_RULES`)."""
    for name in names:
        value = settings[name]
        if not isinstance(value, Sequence) or len(value) != num_stages:
            raise ValueError(f'{backbone}: {name} needs {num_stages} entries '
                             f'(one per stage), got {value!r}.')
        check, kwargs = STAGE_RULES[name]
        for stage, entry in enumerate(value):
            check(backbone, f'{name}[{stage}]', entry, **kwargs)


def check_out_indices(backbone: str, out_indices: Sequence[int],
                      num_stages: int) -> Tuple[int, ...]:
    """Validate ``out_indices`` (0-based stage indices)."""
    out_indices = tuple(out_indices)
    if not out_indices or any(not _is_int(i) or not 0 <= i < num_stages
                              for i in out_indices):
        raise ValueError(f'{backbone}: out_indices must be stage indices in '
                         f'0..{num_stages - 1}, got {out_indices}.')
    return out_indices


def check_input(backbone: str, img: Tensor, in_channels: int,
                min_size: int) -> None:
    """Reject images the backbone cannot process, saying why."""
    if img.dim() != 4 or img.shape[1] != in_channels:
        raise ValueError(f'{backbone} expects images of shape (B, '
                         f'{in_channels}, H, W), got {tuple(img.shape)}. '
                         'Convert grayscale/RGBA images to 3 channels (or '
                         'set in_channels).')
    height, width = img.shape[-2:]
    if height < min_size or width < min_size:
        raise ValueError(f'{backbone} needs inputs of at least {min_size}×'
                         f'{min_size} pixels (its total stride), got '
                         f'{height}×{width}. Resize or pad the image.')


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
