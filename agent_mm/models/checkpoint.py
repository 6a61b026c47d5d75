"""Loading released checkpoints into the agent backbones.

The authors release two layouts:

- ImageNet classification checkpoints, ``{'model': state_dict, 'optimizer':
  ..., 'config': <yacs CfgNode>, ...}``, whose state dict also holds the
  classifier (``head.*``) and a final ``norm.*``;
- downstream checkpoints saved by mmdet 2.x / mmseg 0.x, ``{'state_dict':
  ..., 'meta': ...}``, whose backbone keys start with ``backbone.``.

Plain Swin and PVT (v1) ImageNet checkpoints in their original layout (the
files mmdet's Swin / PVT configs name) load too: their parameter names are
those of the agent backbones wherever the two models share a layer, so every
shared weight is loaded, the plain model's own extras (spatial reduction and
window position bias of blocks that are agent attention here, PVT's class
token) are skipped, and the agent-only parameters are listed in the log.
Swin and PVT weights in OpenMMLab's layout (mmseg's pre-converted Swin files,
models trained with mmdet / mmseg) are converted to the original layout first
(:mod:`.openmmlab_layouts`).
"""
import re
from collections import OrderedDict
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

import torch.nn as nn
from mmengine.logging import MMLogger, print_log
from mmengine.runner import CheckpointLoader
from torch import Tensor

from .openmmlab_layouts import to_original_layout

# Keys of released checkpoints that no backbone uses, skipped when loading:
# the ImageNet classifier and the norm before it, and the shift masks that
# Swin's original code stores as buffers (the backbone builds its own).
IGNORED_EXTRA_KEYS = (r'head\..+', r'norm\..+', r'.+\.attn_mask')
# Keys of plain PVT / Swin checkpoints that agent attention blocks do not
# have: PVT's spatial reduction and class token, Swin's window position bias.
PLAIN_ONLY_KEYS = (r'cls_token', r'.+\.attn\.(sr|norm)\..+',
                   r'.+\.attn\.relative_position_(bias_table|index)')
# Parameters that only agent attention has.
AGENT_ONLY_KEYS = r'(.+\.attn)\.((an|na|ah|aw|ha|wa)_bias|dwc\..+)'
# Unexpected keys listed in an error message, at most.
MAX_KEYS_SHOWN = 10


def _strip_prefix(state_dict: Mapping[str, Tensor],
                  prefix: str) -> Dict[str, Tensor]:
    return OrderedDict((k[len(prefix):] if k.startswith(prefix) else k, v)
                       for k, v in state_dict.items())


def extract_backbone_state_dict(checkpoint: Mapping) -> Dict[str, Tensor]:
    """The backbone's weights from a checkpoint in any released layout.

    Raises:
        ValueError: The checkpoint holds no state dict.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError('A checkpoint must be a dict, got '
                         f'{type(checkpoint).__name__}.')
    for key in ('state_dict', 'model'):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
            break
    state_dict = OrderedDict(
        (k, v) for k, v in checkpoint.items() if hasattr(v, 'shape'))
    if not state_dict:
        raise ValueError('The checkpoint holds no tensors under "state_dict"'
                         ', "model" or at its top level.')
    state_dict = _strip_prefix(state_dict, 'module.')
    if any(k.startswith('backbone.') for k in state_dict):
        state_dict = _strip_prefix(
            {
                k: v
                for k, v in state_dict.items() if k.startswith('backbone.')
            }, 'backbone.')
    return state_dict


def check_shapes(module: nn.Module, state_dict: Mapping[str, Tensor],
                 source: str) -> None:
    """Raise a ``ValueError`` naming every key whose shape differs."""
    own = module.state_dict()
    mismatched = [
        f'{key}: checkpoint {tuple(value.shape)} vs model '
        f'{tuple(own[key].shape)}' for key, value in state_dict.items()
        if key in own and own[key].shape != value.shape
    ]
    if mismatched:
        raise ValueError(
            f'{source} does not fit {type(module).__name__} (is it a '
            'checkpoint of another model or architecture?). Shape '
            'mismatches:\n  ' + '\n  '.join(mismatched))


def list_keys(keys: List[str]) -> str:
    """``keys`` for an error message: the first :data:`MAX_KEYS_SHOWN`, and
    how many more there are."""
    shown = ', '.join(keys[:MAX_KEYS_SHOWN])
    more = len(keys) - MAX_KEYS_SHOWN
    return shown + (f' (and {more} more)' if more > 0 else '')


def is_plain_layout(module: nn.Module, state_dict: Mapping[str,
                                                           Tensor]) -> bool:
    """Whether ``state_dict`` is a plain PVT / Swin one for an agent
    ``module``: the module has agent attention, the checkpoint none."""

    def has_agents(keys: Iterable[str]) -> bool:
        return any(re.fullmatch(AGENT_ONLY_KEYS, key) for key in keys)

    return has_agents(module.state_dict()) and not has_agents(state_dict)


def drop_class_token(module: nn.Module,
                     state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Position embeddings with one token more than the module's (PVT v1's
    class token, first) lose that token, as mmdet's PVT conversion does."""
    own = module.state_dict()
    for key, value in state_dict.items():
        if (key.startswith('pos_embed') and key in own and value.dim() == 3
                and value.shape[1] == own[key].shape[1] + 1):
            state_dict[key] = value[:, 1:]
    return state_dict


def agent_only_summary(missing: List[str]) -> str:
    """One readable line for the agent-only parameters in ``missing``."""
    matches = [re.fullmatch(AGENT_ONLY_KEYS, key) for key in missing]
    modules = sorted({m[1] for m in matches if m})
    names = sorted({m[2] for m in matches if m})
    return (f'{", ".join(names)} of {len(modules)} agent attention modules '
            f'({list_keys(modules)})')


def skip_unbuilt_output_norms(
        module: nn.Module, state_dict: Mapping[str, Tensor]
) -> Tuple[Dict[str, Tensor], List[str]]:
    """``state_dict`` without the weights of the output norms that the
    backbone ``module`` does not build (its ``unbuilt_output_norms()``:
    Agent-Swin's ``norm{i}`` of the stages not in its ``out_indices``, as in
    a checkpoint of a detector with more outputs; mmdet's loading tolerates
    them), and their keys."""
    norms = set(module.unbuilt_output_norms())
    kept, skipped = OrderedDict(), []
    for key, value in state_dict.items():
        if key.split('.', 1)[0] in norms:
            skipped.append(key)
        else:
            kept[key] = value
    return kept, skipped


def check_no_unexpected_keys(module: nn.Module,
                             state_dict: Mapping[str, Tensor], source: str,
                             tolerated: Sequence[str] = ()) -> None:
    """Raise a ``ValueError`` naming the checkpoint weights that ``module``
    does not have, beyond :data:`IGNORED_EXTRA_KEYS` and ``tolerated``
    patterns."""
    own = module.state_dict()
    patterns = (*IGNORED_EXTRA_KEYS, *tolerated)
    unexpected = [
        key for key in state_dict if key not in own and not any(
            re.fullmatch(pattern, key) for pattern in patterns)
    ]
    if unexpected:
        raise ValueError(
            f'{source} has {len(unexpected)} weights that '
            f'{type(module).__name__} does not have: {list_keys(unexpected)}.'
            ' It is most likely a checkpoint of another architecture (e.g. '
            'Agent-PVT-S weights for an Agent-PVT-T backbone): check the '
            'arch / depths of the config against the checkpoint.')


def load_backbone_checkpoint(module: nn.Module, filename: str) -> List[str]:
    """Load released weights into ``module``, reporting unmatched keys.

    Missing keys, the known extras of released checkpoints
    (:data:`IGNORED_EXTRA_KEYS`; for plain PVT / Swin checkpoints also
    :data:`PLAIN_ONLY_KEYS`) and the output norms of stages that the module
    does not output (:func:`skip_unbuilt_output_norms`) are logged through
    mmengine's current logger; any other checkpoint weight the module lacks
    is an error.

    Returns:
        The module's keys that the checkpoint did not provide.

    Raises:
        FileNotFoundError: ``filename`` does not exist.
        ValueError: The checkpoint does not fit the module (shapes, or
            weights the module does not have), or holds no weights of it at
            all.
    """
    logger = MMLogger.get_current_instance()
    checkpoint = CheckpointLoader.load_checkpoint(
        filename, map_location='cpu', logger=logger)
    state_dict, layout = to_original_layout(
        extract_backbone_state_dict(checkpoint))
    if layout:
        print_log(f'{filename}: weights in {layout} layout, converted to the '
                  'original layout', logger='current')
    state_dict = drop_class_token(module, state_dict)
    state_dict, skipped_norms = skip_unbuilt_output_norms(module, state_dict)
    source = f'Checkpoint {filename!r}'
    check_shapes(module, state_dict, source)
    own_keys = set(module.state_dict())
    if not own_keys & set(state_dict):
        raise ValueError(f'{source} shares no weight name with '
                         f'{type(module).__name__}: it is a checkpoint of '
                         'another model.')
    plain = is_plain_layout(module, state_dict)
    check_no_unexpected_keys(module, state_dict, source,
                             PLAIN_ONLY_KEYS if plain else ())
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    print_log(
        f'Loaded {len(own_keys) - len(missing)}/{len(own_keys)} weights of '
        f'{type(module).__name__} from {filename}',
        logger='current')
    if plain:
        print_log(
            'A plain (non-agent) checkpoint: agent-only parameters kept at '
            f'their initial values: {agent_only_summary(missing)}',
            logger='current')
    others = [
        k for k in missing if not (plain and re.fullmatch(AGENT_ONLY_KEYS, k))
    ]
    if others:
        print_log(
            'Weights not in the checkpoint (kept at their initial values): ' +
            ', '.join(others),
            logger='current',
            level=30)
    if skipped_norms:
        print_log(
            'Output norms of stages that the backbone does not output (not '
            'in out_indices), skipped: ' + ', '.join(skipped_norms),
            logger='current')
    if unexpected:
        print_log(
            'Checkpoint weights not used by the backbone (known extras of '
            'released checkpoints): ' + ', '.join(unexpected),
            logger='current')
    return list(missing)
