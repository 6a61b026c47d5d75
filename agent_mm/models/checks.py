"""Validation of the settings of the agent backbones and attention modules.

Every check raises a ``ValueError`` that names the owner, the argument, the
value given, what is allowed and how to fix it.
"""
import math
import numbers
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch.nn as nn
from torch import Tensor

from .layers import build_activation, build_norm

ATTN_IMPLS = ('fast', 'reference')


def _is_int(value: Any) -> bool:
    """An integer, but not a bool (which Python counts as one)."""
    return (isinstance(value, numbers.Integral)
            and not isinstance(value, bool))


def _is_real(value: Any) -> bool:
    """A real number, but not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _as_tuple(value: Any) -> Any:
    """A list or tuple as a tuple (to compare settings); other values as
    they are."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


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


def check_non_negative(owner: str, name: str, value: Any, fix: str) -> None:
    """Raise a ``ValueError`` unless ``value`` is a finite number >= 0."""
    if not (_is_real(value) and 0 <= value < math.inf):
        raise _setting_error(owner, name, value, 'a finite number >= 0', fix)


def check_finite(owner: str, name: str, value: Any, fix: str) -> None:
    """Raise a ``ValueError`` unless ``value`` is a finite number."""
    if not (_is_real(value) and math.isfinite(value)):
        raise _setting_error(owner, name, value, 'a finite number', fix)


def check_choice(owner: str, name: str, value: Any, choices: Sequence[str],
                 fix: str) -> None:
    """Raise a ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise _setting_error(owner, name, value, f'one of {tuple(choices)}',
                             fix)


def check_qk_scale(owner: str, value: Any) -> None:
    """Raise a ``ValueError`` unless ``qk_scale`` is None (the usual
    ``head_dims ** -0.5``) or a finite number > 0."""
    if value is not None:
        check_positive(owner, 'qk_scale', value,
                       'None gives the usual head_dims ** -0.5.')


def check_bool(owner: str, name: str, value: Any) -> None:
    """Raise a ``ValueError`` unless ``value`` is True or False."""
    if not isinstance(value, bool):
        raise _setting_error(owner, name, value, 'True or False',
                             'Give a bool.')


def check_supported(owner: str, name: str, value: Any, supported: Any,
                    why: str) -> None:
    """Raise a ``ValueError`` unless ``value`` is ``supported`` (a sequence
    compared as a tuple): a setting of mmdet's / mmseg's backbones that the
    agent backbone can take only at this value.

    Args:
        owner: Class name, for the message.
        name: Argument name, for the message.
        value: The value given.
        supported: The one value the backbone can honour.
        why: Why other values cannot be honoured, for the message.
    """
    given = _as_tuple(value)
    if given != supported or type(given) is not type(supported):
        raise _setting_error(owner, name, value, repr(supported), why)


def check_alias(owner: str, name: str, value: Any, alias: str,
                alias_value: Any) -> Any:
    """The value of a setting that has two names (e.g. ``depths`` and
    mmdet's ``num_layers``): whichever is given, or ``None``.

    Raises:
        ValueError: Both are given, with different values.
    """
    if alias_value is None:
        return value
    if value is not None and _as_tuple(value) != _as_tuple(alias_value):
        raise ValueError(f'{owner}: {name}={value!r} and {alias}='
                         f'{alias_value!r} name the same setting; give one.')
    return alias_value


def to_size_pair(owner: str, name: str, value: Any, min_size: int,
                 fix: str) -> Tuple[int, int]:
    """``value``, an int or a sequence of one or two ints (as mmdet's
    ``pretrain_img_size``), as ``(h, w)``.

    Raises:
        ValueError: Not such a value, or a side below ``min_size``.
    """
    sides = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(sides) == 1:
        sides *= 2
    if not (len(sides) == 2
            and all(_is_int(side) and side >= min_size for side in sides)):
        raise _setting_error(
            owner, name, value,
            f'an int >= {min_size} or a pair of them (height, width)', fix)
    return sides[0], sides[1]


# Norm layers over axis 1 of NCHW maps: on tokens (B, N, C) they would
# normalise over the tokens instead of the channels.
CHANNEL_FIRST_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm)


def check_layer_cfg(owner: str, name: str, cfg: Any,
                    build: Callable[[dict], nn.Module], example: str) -> None:
    """Raise a ``ValueError`` unless ``cfg`` is an mmcv layer config that
    ``build`` (e.g. ``build_activation``) builds; norms must act on
    the last axis (LayerNorm-like), as the blocks see tokens ``(B, N, C)``.

    Args:
        owner: Class name, for the message.
        name: Argument name (``norm_cfg``, ``act_cfg``).
        cfg: The value given.
        build: Builds a layer from ``cfg``.
        example: A valid config, for the message.
    """
    fix = f'Use e.g. {example}.'
    if not (isinstance(cfg, dict) and 'type' in cfg):
        raise _setting_error(owner, name, cfg, 'a dict with a "type" key',
                             fix)
    try:
        layer = build(cfg)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise _setting_error(owner, name, cfg, 'an mmcv layer config',
                             f'Building it failed: {error}. {fix}') from error
    if isinstance(layer, CHANNEL_FIRST_NORMS):
        raise _setting_error(
            owner, name, cfg, 'a norm over the channels of tokens (B, N, C)',
            f'{type(layer).__name__} normalises axis 1 of NCHW maps. {fix}')


def check_norm_and_act_cfgs(owner: str, norm_cfg: Optional[dict],
                            act_cfg: Optional[dict]) -> None:
    """:func:`check_layer_cfg` of a backbone's ``norm_cfg`` and
    ``act_cfg`` (None: the backbone's defaults)."""
    if norm_cfg is not None:
        check_layer_cfg(owner, 'norm_cfg', norm_cfg,
                        lambda cfg: build_norm(cfg, 8),
                        "dict(type='LN', eps=1e-6)")
    if act_cfg is not None:
        check_layer_cfg(owner, 'act_cfg', act_cfg, build_activation,
                        "dict(type='GELU')")


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
    'patch_sizes': (check_int_range,
                    dict(low=1, fix='The released models use 4, 2, 2, 2.')),
    'agent_num': (check_agent_num, {}),
    'agent_shapes': (check_agent_shape, {}),
}


def check_stage_lists(backbone: str, num_stages: int, settings: Dict[str, Any],
                      names: Iterable[str]) -> None:
    """Raise a ``ValueError`` unless each named setting has one valid entry
    per stage (see :data:`STAGE_RULES`)."""
    for name in names:
        value = settings[name]
        if not isinstance(value, Sequence) or len(value) != num_stages:
            raise ValueError(f'{backbone}: {name} needs {num_stages} entries '
                             f'(one per stage), got {value!r}. Give a list '
                             f'of {num_stages} values, stage 0 first.')
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
                         f'0..{num_stages - 1}, got {out_indices}. List the '
                         'stages whose outputs you need, e.g. '
                         f'{tuple(range(num_stages))} for all of them.')
    return out_indices


def check_input(backbone: str, img: Tensor, in_channels: int,
                min_size: int) -> None:
    """Reject images the backbone cannot process, saying why."""
    expected = (f'{backbone} expects images of shape (B, {in_channels}, H, '
                f'W), got {tuple(img.shape)}.')
    if img.dim() == 3:
        raise ValueError(f'{expected} Add the batch dimension to a single '
                         '(C, H, W) image: img.unsqueeze(0).')
    if img.dim() != 4:
        raise ValueError(f'{expected} Give a 4-D batch of images.')
    if img.shape[1] != in_channels:
        raise ValueError(f'{expected} Convert the images to {in_channels} '
                         'channels (e.g. grayscale or RGBA to RGB), or set '
                         f'in_channels={img.shape[1]}.')
    height, width = img.shape[-2:]
    if height < min_size or width < min_size:
        raise ValueError(f'{backbone} needs inputs of at least {min_size}×'
                         f'{min_size} pixels (its total stride), got '
                         f'{height}×{width}. Resize or pad the image.')


def check_agent_attention(embed_dims: Any, num_heads: Any, pretrain_grid: Any,
                          agent_num: Any, agent_shape: Any, attn_drop: Any,
                          proj_drop: Any, attn_impl: Any,
                          bias_cache_size: Any, bias_cache_admit_after: Any,
                          qk_scale: Any) -> None:
    """Raise a ``ValueError`` naming the first invalid argument of
    :class:`AgentAttention`."""
    name = 'AgentAttention'
    check_int_range(
        name,
        'embed_dims',
        embed_dims,
        1,
        fix='Give the channels C of the tokens.')
    check_num_heads(name, 'num_heads', num_heads, embed_dims)
    check_int_pair(name, 'pretrain_grid', pretrain_grid,
                   'Give the token grid (r_h, r_w) the row/column biases '
                   'were learned on.')
    check_agent_num(name, 'agent_num', agent_num)
    check_agent_shape(name, 'agent_shape', agent_shape)
    check_probability(name, 'attn_drop', attn_drop,
                      '0 turns attention dropout off.')
    check_probability(name, 'proj_drop', proj_drop,
                      '0 turns projection dropout off.')
    check_choice(name, 'attn_impl', attn_impl, ATTN_IMPLS,
                 "'fast' for use, 'reference' for the literal equations.")
    check_int_range(
        name,
        'bias_cache_size',
        bias_cache_size,
        0,
        fix='0 turns the eval bias cache off.')
    check_int_range(
        name,
        'bias_cache_admit_after',
        bias_cache_admit_after,
        1,
        fix='1 caches a shape at its first forward, 2 at its second.')
    check_qk_scale(name, qk_scale)


def check_tokens(owner: str,
                 x: Tensor,
                 hw_shape: Sequence[int],
                 channels: int,
                 maps_module: Optional[str] = None) -> None:
    """Raise a ``ValueError`` unless ``x`` is ``(B, H*W, C)`` tokens of
    ``channels`` channels laid out as the grid ``hw_shape``: what every
    token mixer's ``forward(x, hw_shape)`` takes.

    Args:
        owner: Class name, for the message.
        x: The tokens given.
        hw_shape: The grid ``(H, W)`` given.
        channels: The channels ``C`` the mixer was built for.
        maps_module: A module that takes ``(B, C, H, W)`` maps instead, to
            suggest for a 4-D input.
    """
    height, width = hw_shape
    tokens = height * width
    if x.dim() == 3 and x.shape[1] == tokens and x.shape[2] == channels:
        return
    if x.dim() != 3:
        fix = ('Flatten a (B, C, H, W) map to tokens with '
               'x.flatten(2).transpose(1, 2)')
        fix += f', or use {maps_module}.' if maps_module else '.'
    elif x.shape[2] != channels:
        fix = (f'Give tokens of the {channels} channels (embed_dims) it '
               'was built with.')
    else:
        fix = ('Give hw_shape=(H, W) of the grid the tokens were flattened '
               'from: H*W must be their number.')
    raise ValueError(f'{owner} expects (B, H*W, C={channels}) tokens laid '
                     f'out as hw_shape={tuple(hw_shape)} ({tokens} tokens), '
                     f'got a tensor of shape {tuple(x.shape)}. {fix}')
