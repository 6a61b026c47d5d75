"""Pick the checkpoint that ``--resume`` (no value) continues from.

mmengine resumes from the file named in ``<work_dir>/last_checkpoint``. When
that file is missing or truncated (e.g. a run killed while saving with
mmengine's ``CheckpointHook``), or when there is no ``last_checkpoint`` (e.g.
checkpoints copied into a new work dir), :func:`find_resume_checkpoint` falls
back to the newest complete ``epoch_N.pth`` / ``iter_N.pth`` instead of
failing or starting from scratch. :class:`ResumeFallbackHook` runs it in
the runner, so that what it decides is in the run's log.
"""
import logging
import os
import os.path as osp
import re
import zipfile
from typing import Iterable, List, Optional, Tuple

from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS
from mmengine.runner import Runner

LAST_CHECKPOINT = 'last_checkpoint'
NUMBERED_CHECKPOINT = re.compile(r'(?:epoch|iter)_(\d+)\.pth')


def checkpoint_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be resumed from, or ``None`` if it looks complete.

    Cheap: only the end of the file is read. torch saves a zip archive whose
    directory is written last, so a truncated checkpoint is not a zip file.
    """
    if not osp.isfile(path):
        return 'the file does not exist'
    if not zipfile.is_zipfile(path):
        return 'the file is truncated or not a PyTorch checkpoint'
    return None


def numbered_checkpoints(folders: Iterable[str]) -> List[str]:
    """The ``epoch_N.pth`` / ``iter_N.pth`` files in ``folders`` (absolute
    paths), highest N first."""
    steps = {}
    for folder in folders:
        if not osp.isdir(folder):
            continue
        for name in os.listdir(folder):
            match = NUMBERED_CHECKPOINT.fullmatch(name)
            if match:
                steps[osp.join(osp.abspath(folder), name)] = int(match[1])
    return sorted(steps, key=steps.__getitem__, reverse=True)


def warn(message: str) -> None:
    """Log ``message`` as a warning of the current mmengine logger."""
    print_log(message, logger='current', level=logging.WARNING)


def inform(message: str) -> None:
    """Log ``message`` as information of the current mmengine logger."""
    print_log(message, logger='current', level=logging.INFO)


def recorded_checkpoint(record: str) -> Tuple[Optional[str], str]:
    """The checkpoint that a ``last_checkpoint`` file names.

    Args:
        record: The path of the ``last_checkpoint`` file.

    Returns:
        The absolute path of the named checkpoint (``None`` if ``record`` is
        missing or empty), and why another checkpoint is resumed from if
        that one is not.
    """
    if not osp.isfile(record):
        return None, f'{record} does not exist'
    with open(record) as f:
        recorded = f.read().strip()
    if not recorded:
        return None, f'{record} is empty'
    return osp.abspath(recorded), (f'the one {record} names is missing or '
                                   'incomplete')


def find_resume_checkpoint(work_dir: str) -> Optional[str]:
    """The checkpoint to resume the run in ``work_dir`` from.

    That is the file named in ``<work_dir>/last_checkpoint`` if it is
    complete; otherwise (the file is missing, truncated or not named because
    ``last_checkpoint`` is missing or empty) the newest complete
    ``epoch_N.pth`` / ``iter_N.pth`` (by N) in the work dir or next to the
    named file. Each skipped file is logged as a warning with the reason, and
    so is the fallback.

    Args:
        work_dir: The work dir of the run.

    Returns:
        The checkpoint path, or ``None`` to start from scratch (logged): when
        there is no checkpoint at all (nothing was saved) or no complete one
        (with a warning).
    """
    record = osp.join(work_dir, LAST_CHECKPOINT)
    recorded, why = recorded_checkpoint(record)
    if recorded is None:
        candidates = numbered_checkpoints((work_dir, ))
    else:
        candidates = [recorded, *numbered_checkpoints(
            (work_dir, osp.dirname(recorded)))]
    if not candidates and not osp.isfile(record):
        inform(f'No checkpoint in {work_dir} to resume from: training '
               'starts from scratch.')
        return None
    for path in dict.fromkeys(candidates):
        problem = checkpoint_problem(path)
        if problem is None:
            if path != recorded:
                warn(f'Resuming from {path}, the newest complete '
                     f'checkpoint, as {why}.')
            return path
        warn(f'Skipping checkpoint {path}: {problem}.')
    warn(f'No complete checkpoint in {work_dir} ({why}): training starts '
         'from scratch.')
    return None


@HOOKS.register_module()
class ResumeFallbackHook(Hook):
    """Resume a run that has ``resume=True`` and no ``load_from`` (what
    ``tools/train.py --resume`` without a value gives) from
    :func:`find_resume_checkpoint`'s choice instead of mmengine's
    ``last_checkpoint`` alone; start from scratch if there is none.

    It decides before the runner loads anything (``before_run``), once the
    run's logger exists: the skipped files and the fallback are logged in
    the run's log, by rank 0 only on the console.
    """
    priority = 'VERY_HIGH'

    def before_run(self, runner: Runner) -> None:
        if runner._resume and runner._load_from is None:
            runner._load_from = find_resume_checkpoint(runner.work_dir)
            runner._resume = runner._load_from is not None
