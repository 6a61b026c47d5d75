"""Refuse checkpoints whose weights do not match the model being run.

mmengine loads ``load_from`` and ``--resume`` checkpoints non-strictly: a
checkpoint of another architecture, or an ImageNet backbone file given as a
detector checkpoint, evaluates (partly) random weights with a warning at
most. :class:`CheckpointMatchHook` checks the weight names before mmengine
loads them and raises an error that says which keys differ and how many.
"""
import re
from typing import Collection, List, Mapping, Optional, Tuple

import torch.nn as nn
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import Runner

from ..models.checkpoint import list_keys
from .model_wrapper import runner_model

# Keys allowed to differ between a checkpoint and the model: batch-norm step
# counters (absent from checkpoints of older PyTorch releases) and the
# buffers that models rebuild from their settings.
TOLERATED_KEYS = (r'.*num_batches_tracked', r'.+\.relative_position_index',
                  r'.+\.attn_mask')


def _tolerated(key: str) -> bool:
    return any(re.fullmatch(pattern, key) for pattern in TOLERATED_KEYS)


def key_mismatch(model_keys: Collection[str],
                 checkpoint_keys: Collection[str]) -> Tuple[List[str],
                                                            List[str]]:
    """Model keys missing from a checkpoint and checkpoint keys the model
    lacks, both without :data:`TOLERATED_KEYS`, sorted."""
    model_keys, checkpoint_keys = set(model_keys), set(checkpoint_keys)
    missing = sorted(k for k in model_keys - checkpoint_keys
                     if not _tolerated(k))
    unexpected = sorted(k for k in checkpoint_keys - model_keys
                        if not _tolerated(k))
    return missing, unexpected


def model_state_dict(checkpoint: Mapping, source: str) -> Mapping:
    """The model weights of an mmengine (or mmdet 2.x / mmseg 0.x)
    checkpoint, without a DDP ``module.`` prefix.

    Raises:
        ValueError: The file is an ImageNet classification checkpoint (the
            authors' ``{'model': ...}`` layout), i.e. backbone weights only.
    """
    if 'state_dict' not in checkpoint and isinstance(
            checkpoint.get('model'), Mapping):
        raise ValueError(
            f'{source} is an ImageNet classification checkpoint (its weights '
            'are under "model"): it holds a backbone, not this model. Pass '
            'it as model.backbone.init_cfg=dict(type="Pretrained", '
            'checkpoint=...) and train, or test a checkpoint saved by '
            'training this config.')
    state_dict = checkpoint.get('state_dict', checkpoint)
    return {re.sub(r'^module\.', '', k): v for k, v in state_dict.items()}


def mismatch_message(model_keys: Collection[str],
                     checkpoint_keys: Collection[str],
                     source: str) -> Optional[str]:
    """A description of the key mismatch, or None if the keys match."""
    missing, unexpected = key_mismatch(model_keys, checkpoint_keys)
    if not missing and not unexpected:
        return None
    parts = []
    if missing:
        parts.append(f'{len(missing)} of the model\'s {len(model_keys)} '
                     f'weights are missing: {list_keys(missing)}')
    if unexpected:
        parts.append(f'{len(unexpected)} weights are not in the model: '
                     f'{list_keys(unexpected)}')
    return f'{source} does not match the model: ' + '; '.join(parts) + '.'


def checkpoint_mismatch(model: nn.Module, checkpoint: Mapping,
                        source: str) -> Optional[str]:
    """:func:`mismatch_message` of ``model``'s weights and those of an
    mmengine ``checkpoint`` (:func:`model_state_dict`), or None if they
    match."""
    return mismatch_message(model.state_dict().keys(),
                            model_state_dict(checkpoint, source).keys(),
                            source)


@HOOKS.register_module()
class CheckpointMatchHook(Hook):
    """Raise before a checkpoint whose weight names do not match the model
    is loaded (``load_from``, ``--resume``, ``tools/test.py``).

    Keys of :data:`TOLERATED_KEYS` may differ. ``tools/train.py`` and
    ``tools/test.py`` add this hook to every run; ``--partial-load`` (or
    ``--cfg-options partial_load=True``) turns the error into a warning for a
    deliberate partial load, e.g. fine-tuning from another detector.

    Args:
        partial_load: Only warn about mismatched keys.
    """
    priority = 'LOWEST'

    def __init__(self, partial_load: bool = False) -> None:
        self.partial_load = partial_load

    def after_load_checkpoint(self, runner: Runner,
                              checkpoint: dict) -> None:
        """Compare the checkpoint's weight names with the model's."""
        source = f'Checkpoint {runner._load_from!r}' if getattr(
            runner, '_load_from', None) else 'The checkpoint'
        message = checkpoint_mismatch(runner_model(runner), checkpoint, source)
        if message is None:
            return
        if not self.partial_load:
            raise ValueError(
                message + ' Is it a checkpoint of another model or arch? '
                'To load the matching weights only on purpose, pass '
                '--partial-load (or --cfg-options partial_load=True).')
        runner.logger.warning(message + ' Loading the matching weights only '
                              '(partial_load=True).')
