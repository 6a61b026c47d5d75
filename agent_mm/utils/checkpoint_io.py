"""Safe checkpoint reading for mmengine on torch >= 2.6, on every scheme.

Since torch 2.6, ``torch.load`` only unpickles plain data by default
(``weights_only=True``). mmengine 0.10.7 relies on the old behaviour, so it
cannot read its own resume checkpoints (numpy arrays in ``meta``,
``HistoryBuffer`` objects in ``message_hub``) nor the authors' ImageNet
checkpoints (a yacs ``CfgNode`` under ``config``), and its URL loader still
unpickles anything (``torch.hub.load_state_dict_from_url`` with
``weights_only=False``). Rather than switching the protection off,
:func:`register_safe_globals` allow-lists exactly the constructors those files
need, a ``copyreg`` reducer makes ``HistoryBuffer`` pickle through one
allow-listed function instead of bound methods, and every scheme of mmengine's
``CheckpointLoader`` (local paths, ``http(s)://``, ``torchvision://``,
``modelzoo://``, ``open-mmlab://``, ``openmmlab://``, ``mmcls://``,
``pavi://``, ``s3://`` / ``petrel://``) is replaced by a loader that reads
the bytes (downloading them first where needed) and hands them to
:func:`read_checkpoint`. Files with any other pickled callable are refused
with an error that says why and how to proceed; files that are not PyTorch
checkpoints at all (text, HTML error pages, random bytes) are named as such.
"""
import collections
import copyreg
import io
import os
import os.path as osp
import pickle
import tempfile
from typing import IO, Any, Callable, Dict, Optional, Tuple, Union
from urllib.parse import urlparse

import numpy as np
import torch
import torch.distributed as dist
from mmengine.dist import get_dist_info
from mmengine.fileio import get_file_backend
from mmengine.logging import HistoryBuffer
from mmengine.runner import CheckpointLoader
from mmengine.runner.checkpoint import (_get_mmengine_home,
                                        _process_mmcls_checkpoint,
                                        get_deprecated_model_names,
                                        get_external_models, get_mmcls_models,
                                        get_torchvision_models)

# How files written by ``torch.save`` start: a zip archive (torch >= 1.6) or
# the pickled magic number of the legacy format.
ZIP_MAGIC = b'PK\x03\x04'
LEGACY_MAGIC = b'\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19'


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


def _head(source: Union[str, IO[bytes]], size: int) -> bytes:
    """The first ``size`` bytes of a file or of a seekable stream."""
    if isinstance(source, str):
        with open(source, 'rb') as f:
            return f.read(size)
    start = source.tell()
    head = source.read(size)
    source.seek(start)
    return head


def read_checkpoint(source: Union[str, IO[bytes]],
                    map_location: Optional[Any] = None,
                    name: Optional[str] = None) -> Any:
    """``torch.load(source, weights_only=True)`` with errors that say what
    is wrong with the file and what to do.

    Args:
        source: A local path or a seekable binary stream.
        map_location: As for ``torch.load``.
        name: How to call the file in messages (default: the path).

    Raises:
        CheckpointError: The data is not a PyTorch checkpoint, is truncated
            or damaged, or holds a pickled object that is not plain data
            (refused, never executed).
    """
    name = name or str(source)
    head = _head(source, len(LEGACY_MAGIC))
    if not (head.startswith(ZIP_MAGIC) or head == LEGACY_MAGIC):
        raise CheckpointError(
            f'{name!r} is not a PyTorch checkpoint (it starts with '
            f'{head[:8]!r}; a text file, an HTML error page or another '
            'format?). Check the path or URL and download the file again.')
    try:
        return torch.load(
            source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if 'GLOBAL' not in str(err):
            raise _damaged(name, err) from err
        raise CheckpointError(
            f'Refused to load {name!r}: it contains a pickled object '
            'that is not plain data, and unpickling it could run arbitrary '
            'code. agent_mm reads checkpoints with torch.load('
            'weights_only=True). If you trust the file, re-save its weights '
            'only, e.g. torch.save({"state_dict": torch.load(path, '
            'weights_only=False)["state_dict"]}, new_path). '
            f'Details from torch: {err}') from err
    except Exception as err:  # torch raises many types for bad archives
        raise _damaged(name, err) from err


def _damaged(name: str, err: Exception) -> CheckpointError:
    return CheckpointError(
        f'Cannot read checkpoint {name!r}: the file is truncated or '
        'damaged. Download or save it again. '
        f'Details from torch: {type(err).__name__}: {err}')


def load_from_local(filename: str, map_location: Optional[Any] = None) -> Any:
    """Read a local checkpoint through :func:`read_checkpoint`.

    Raises:
        FileNotFoundError: ``filename`` does not exist.
        CheckpointError: See :func:`read_checkpoint`.
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        hint = ''
        if osp.normpath(filename).split(os.sep)[0] == 'data':
            hint = (' The paper\'s configs expect the authors\' checkpoints '
                    'under data/ (see the README); download them there or '
                    'point init_cfg.checkpoint elsewhere.')
        raise FileNotFoundError(
            f'Checkpoint file not found: {filename!r}.{hint}')
    return read_checkpoint(filename, map_location)


def _download(url: str, cached_file: str) -> None:
    """Download ``url`` to ``cached_file`` unless it is there already
    (``torch.hub`` writes a temporary file and renames it when complete)."""
    if not osp.isfile(cached_file):
        os.makedirs(osp.dirname(cached_file), exist_ok=True)
        torch.hub.download_url_to_file(url, cached_file, progress=False)


def load_from_http(url: str,
                   map_location: Optional[Any] = None,
                   model_dir: Optional[str] = None) -> Any:
    """Download a checkpoint once into the torch hub cache, then read the
    file through :func:`read_checkpoint`.

    In distributed runs, rank 0 downloads while the other ranks wait, then
    they read its file (on nodes that do not share the cache with rank 0's,
    each rank downloads a copy: a temporary file renamed when complete, so
    no rank reads a partial one). A cached file that cannot be read is
    removed by rank 0, so that the next attempt downloads it again.
    """
    model_dir = model_dir or osp.join(torch.hub.get_dir(), 'checkpoints')
    cached_file = osp.join(model_dir, osp.basename(urlparse(url).path))
    rank, world_size = get_dist_info()
    if rank == 0:
        _download(url, cached_file)
    if world_size > 1:
        dist.barrier()
        _download(url, cached_file)
    try:
        return read_checkpoint(cached_file, map_location,
                               f'{url} (cached as {cached_file})')
    except CheckpointError:
        if rank == 0 and osp.isfile(cached_file):
            os.remove(cached_file)
        raise


def load_from_torchvision(filename: str,
                          map_location: Optional[Any] = None) -> Any:
    """``torchvision://NAME`` (or the older ``modelzoo://NAME``)."""
    name = filename.split('://', 1)[1]
    return load_from_http(get_torchvision_models()[name], map_location)


def load_from_openmmlab(filename: str,
                        map_location: Optional[Any] = None) -> Any:
    """``open-mmlab://NAME`` / ``openmmlab://NAME``: a URL or a file under
    mmengine's home, from mmengine's model table."""
    name = filename.split('://', 1)[1]
    name = get_deprecated_model_names().get(name, name)
    location = get_external_models()[name]
    if location.startswith(('http://', 'https://')):
        return load_from_http(location, map_location)
    return load_from_local(
        osp.join(_get_mmengine_home(), location), map_location)


def load_from_mmcls(filename: str, map_location: Optional[Any] = None) -> Any:
    """``mmcls://NAME``: an mmcls classifier, keys renamed to backbone
    keys as mmengine does."""
    url = get_mmcls_models()[filename.split('://', 1)[1]]
    return _process_mmcls_checkpoint(load_from_http(url, map_location))


def load_from_ceph(filename: str,
                   map_location: Optional[Any] = None,
                   backend: str = 'petrel') -> Any:
    """``s3://`` / ``petrel://`` paths, read through mmengine's file
    backend."""
    data = get_file_backend(
        filename, backend_args={
            'backend': backend
        }).get(filename)
    return read_checkpoint(io.BytesIO(data), map_location, filename)


def load_from_pavi(filename: str, map_location: Optional[Any] = None) -> Any:
    """``pavi://`` model cloud paths, downloaded to a temporary folder."""
    try:
        from pavi import modelcloud
    except ImportError as err:
        raise ImportError('Install pavi to load checkpoints from pavi://'
                          ' paths.') from err
    model = modelcloud.get(filename[len('pavi://'):])
    with tempfile.TemporaryDirectory() as tmp_dir:
        downloaded = osp.join(tmp_dir, model.name)
        model.download(downloaded)
        return read_checkpoint(downloaded, map_location, filename)


# Every scheme mmengine 0.10.7 registers, and its safe loader.
SAFE_LOADERS: Dict[Callable[..., Any], Tuple[str, ...]] = {
    load_from_local: ('', ),
    load_from_http: ('http://', 'https://'),
    load_from_torchvision: ('modelzoo://', 'torchvision://'),
    load_from_openmmlab: ('open-mmlab://', 'openmmlab://'),
    load_from_mmcls: ('mmcls://', ),
    load_from_pavi: ('pavi://', ),
    load_from_ceph: (r'(\S+\:)?s3://', r'(\S+\:)?petrel://'),
}

_registered = False


def register_safe_globals() -> None:
    """Make every mmengine checkpoint scheme safe (idempotent).

    Allow-lists what mmengine's and the authors' checkpoints need:

    - numpy arrays, dtypes and scalars (``meta`` of mmengine checkpoints);
    - :class:`HistoryBuffer`, through :func:`_rebuild_history_buffer`;
    - the authors' yacs ``CfgNode`` config, read as an ``OrderedDict`` so that
      yacs need not be installed;

    and registers the loaders of :data:`SAFE_LOADERS` in mmengine's
    ``CheckpointLoader``.
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
    for loader, prefixes in SAFE_LOADERS.items():
        CheckpointLoader.register_scheme(
            prefixes=list(prefixes), loader=loader, force=True)
    _registered = True
