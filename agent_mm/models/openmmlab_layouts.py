"""Swin and PVT (v1) weights in OpenMMLab's layout, back in the original one.

mmdet's and mmseg's ``SwinTransformer`` and mmdet's
``PyramidVisionTransformer`` name and shape some layers differently from the
original releases, whose layout the agent backbones keep. Their weights
(mmseg's pre-converted Swin ImageNet files, models trained with mmdet /
mmseg) are converted back here, so that they load like the original files.
"""
import re
from collections import OrderedDict
from typing import Dict, Mapping, Optional, Tuple

from torch import Tensor

# Swin: renamed layers (patterns and their original names) and, in patch
# merging, the four 2x2 neighbours' channels interleaved in nn.Unfold's order
# instead of concatenated as x0, x1, x2, x3.
SWIN_KEY = r'stages\.\d+\.blocks\.\d+\..+'
SWIN_RENAMES = ((r'^stages\.', 'layers.'), (r'\.attn\.w_msa\.', '.attn.'),
                (r'\.ffn\.layers\.0\.0\.', '.mlp.fc1.'),
                (r'\.ffn\.layers\.1\.', '.mlp.fc2.'),
                (r'^patch_embed\.projection\.', 'patch_embed.proj.'))
SWIN_MERGING_KEY = r'stages\.\d+\.downsample\.(reduction|norm)\..+'
# Unfold's neighbour order is (0, 0), (0, 1), (1, 0), (1, 1); the original
# concatenates (0, 0), (1, 0), (0, 1), (1, 1): the middle two swap.
UNFOLD_TO_CONCAT = [0, 2, 1, 3]

# PVT: stage i is ``layers.i`` = (patch embedding, ([position embedding,]
# blocks), norm after the stage (with ``norm_after_stage``; else nn.Identity,
# no weights)); attention is nn.MultiheadAttention (q, k, v in one
# projection), the MLP 1x1 convolutions.
PVT_KEY = r'layers\.\d+\.0\.projection\.weight'
PVT_PATCH_EMBED = r'layers\.(\d+)\.0\.(projection|norm)\.(.+)'
PVT_POS_EMBED = r'layers\.(\d+)\.1\.0\.pos_embed'
PVT_BLOCK = r'layers\.(\d+)\.1\.(\d+)\.(.+)'
PVT_STAGE_NORM = r'layers\.(\d+)\.2\.(.+)'
PVT_BLOCK_RENAMES = (
    ('attn.attn.out_proj.', 'attn.proj.'),
    ('ffn.layers.0.', 'mlp.fc1.'),
    ('ffn.layers.3.', 'mlp.fc2.'),
)


def merging_channels_in_concat_order(value: Tensor) -> Tensor:
    """A Swin patch-merging weight or norm parameter whose last dimension
    (4C) is in nn.Unfold's order (channel-major) in the original's
    (neighbour blocks of C, concatenated)."""
    by_neighbour = value.unflatten(-1, (-1, 4)).transpose(-1, -2)
    return by_neighbour[..., UNFOLD_TO_CONCAT, :].flatten(-2)


def swin_from_openmmlab(
        state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """The original layout of Swin weights in mmdet's / mmseg's."""
    converted = OrderedDict()
    for key, value in state_dict.items():
        if re.fullmatch(SWIN_MERGING_KEY, key):
            value = merging_channels_in_concat_order(value)
        for pattern, original in SWIN_RENAMES:
            key = re.sub(pattern, original, key)
        converted[key] = value
    return converted


def pvt_block_weights(stage: int, block: int, name: str,
                      value: Tensor) -> Dict[str, Tensor]:
    """The original weights of one mmdet PVT block weight ``name``."""
    prefix = f'block{stage + 1}.{block}.'
    if name.startswith('attn.attn.in_proj_'):
        kind = name[len('attn.attn.in_proj_'):]
        dims = value.shape[0] // 3
        return {f'{prefix}attn.q.{kind}': value[:dims],
                f'{prefix}attn.kv.{kind}': value[dims:]}
    for openmmlab, original in PVT_BLOCK_RENAMES:
        if name.startswith(openmmlab):
            name = original + name[len(openmmlab):]
            break
    if value.dim() == 4 and name.startswith('mlp.'):
        value = value.flatten(1)  # 1x1 convolution -> linear
    return {prefix + name: value}


def pvt_from_openmmlab(
        state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """The original layout of PVT (v1) weights in mmdet's."""
    has_pos_embed = any(re.fullmatch(PVT_POS_EMBED, k) for k in state_dict)
    converted = OrderedDict()
    for key, value in state_dict.items():
        # the position embedding first: its key also has a block's form
        if match := re.fullmatch(PVT_POS_EMBED, key):
            converted[f'pos_embed{int(match[1]) + 1}'] = value
        elif match := re.fullmatch(PVT_PATCH_EMBED, key):
            stage, layer, name = match.groups()
            layer = 'proj' if layer == 'projection' else layer
            converted[f'patch_embed{int(stage) + 1}.{layer}.{name}'] = value
        elif match := re.fullmatch(PVT_STAGE_NORM, key):
            converted[f'norm{int(match[1]) + 1}.{match[2]}'] = value
        elif match := re.fullmatch(PVT_BLOCK, key):
            stage, index, name = match.groups()
            converted.update(
                pvt_block_weights(
                    int(stage),
                    int(index) - has_pos_embed, name, value))
        else:
            converted[key] = value
    return converted


def to_original_layout(
        state_dict: Mapping[str, Tensor]
) -> Tuple[Mapping[str, Tensor], Optional[str]]:
    """``state_dict`` in the original layout, and the name of the
    OpenMMLab layout it was converted from (None if it was not)."""
    if any(re.fullmatch(SWIN_KEY, key) for key in state_dict):
        return swin_from_openmmlab(state_dict), "mmdet / mmseg's Swin"
    if any(re.fullmatch(PVT_KEY, key) for key in state_dict):
        return pvt_from_openmmlab(state_dict), "mmdet's PVT"
    return state_dict, None
