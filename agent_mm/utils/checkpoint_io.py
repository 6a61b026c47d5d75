"""Safe checkpoint reading for mmengine on torch >= 2.6.

Since torch 2.6, ``torch.load`` only unpickles plain data by default
(``weights_only=True``). mmengine 0.10.7 relies on the old behaviour, so it
cannot read its own resume checkpoints (numpy arrays in ``meta``,
``HistoryBuffer`` objects in ``message_hub``) nor the authors' ImageNet
checkpoints (a yacs ``CfgNode`` under ``config``). Rather than switching the
protection off, :func:`register_safe_globals` allow-lists exactly the
constructors those files need, and a ``copyreg`` reducer makes
``HistoryBuffer`` pickle through one allow-listed function instead of bound
methods. Files with any other pickled callable are still refused, with an
error that says why and how to proceed (see :func:`load_local_checkpoint`).
"""
import collections
import copyreg
import os.path as osp
import pickle
from typing import Any, Optional

import numpy as np
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner import CheckpointLoader


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read safely."""


def _rebuild_history_buffer(log_history: np.ndarray,
                            count_history: np.ndarray,
                            max_length: int) -> HistoryBuffer:
    """Recreate a :class:`HistoryBuffer` from its recorded data."""
    return HistoryBuffer(log_history.tolist(), count_history.tolist(),
                         max_length)


def _reduce_history_buffer(buffer: HistoryBuffer) -> tuple:
    """Pickle a :class:`HistoryBuffer` as its data only (no bound methods)."""
    log_history, count_history = buffer.data
    return _rebuild_history_buffer, (log_history, count_history,
                                     buffer.max_length)


def _numpy_globals() -> list:
    """Constructors that ``pickle`` uses for numpy arrays and scalars."""
    multiarray = np._core.multiarray if hasattr(
        np, '_core') else np.core.multiarray
    dtype_classes = [
        getattr(np.dtypes, name) for name in np.dtypes.__all__
        if isinstance(getattr(np.dtypes, name), type)
    ]
    return [
        np.ndarray,
        np.dtype,
        multiarray._reconstruct,
        multiarray.scalar,
        # Files written with numpy 1.x name the old module path.
        (multiarray._reconstruct, 'numpy.core.multiarray._reconstruct'),
        (multiarray.scalar, 'numpy.core.multiarray.scalar'),
        bytes,
        *dtype_classes,
    ]


_registered = False


def register_safe_globals() -> None:
    """Allow-list what mmengine and the authors' checkpoints need (idempotent).

    - numpy arrays, dtypes and scalars (``meta`` of mmengine checkpoints);
    - :class:`HistoryBuffer`, through :func:`_rebuild_history_buffer`;
    - the authors' yacs ``CfgNode`` config, read as an ``OrderedDict`` so that
      yacs need not be installed.
    """
    global _registered
    if _registered:
        return
    copyreg.pickle(HistoryBuffer, _reduce_history_buffer)
    torch.serialization.add_safe_globals([
        *_numpy_globals(),
        _rebuild_history_buffer,
        (collections.OrderedDict, 'yacs.config.CfgNode'),
    ])
    CheckpointLoader.register_scheme(
        prefixes='', loader=load_local_checkpoint, force=True)
    _registered = True


def load_local_checkpoint(filename: str,
                          map_location: Optional[Any] = None) -> Any:
    """Read a local checkpoint with ``torch.load(weights_only=True)``.

    Registered as mmengine's loader for local paths, so every mmengine and
    OpenMMLab entry point (``load_checkpoint``, ``init_cfg=Pretrained``,
    ``--resume``) goes through it.

    Raises:
        FileNotFoundError: ``filename`` does not exist.
        CheckpointError: the file is truncated/corrupted, or it holds a
            pickled object that is not plain data (refused, never executed).
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(
            f'Checkpoint file not found: {filename!r}. Check the path '
            '(configs expect the authors\' checkpoints under data/).')
    try:
        return torch.load(
            filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f'Refused to load {filename!r}: it contains a pickled object '
            'that is not plain data, and unpickling it could run arbitrary '
            'code. agent_mm reads checkpoints with torch.load('
            'weights_only=True). If you trust the file, re-save its weights '
            'only, e.g. torch.save({"state_dict": torch.load(path, '
            'weights_only=False)["state_dict"]}, new_path). '
            f'Details from torch: {err}') from err
    except (RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(
            f'Cannot read checkpoint {filename!r}: the file is truncated or '
            'is not a PyTorch checkpoint. Download or save it again. '
            f'Details from torch: {err}') from err
