"""A checkpoint hook whose saves survive being killed at any moment."""
import glob
import os
import os.path as osp
from typing import List

from mmengine.dist import is_main_process
from mmengine.fileio import LocalBackend
from mmengine.hooks import CheckpointHook
from mmengine.registry import HOOKS
from mmengine.runner import Runner

from .resume import LAST_CHECKPOINT

# temporary files are hidden and named after the file they will become
TMP_PATTERN = '.{}.tmp'


def temporary_path(path: str) -> str:
    """Where ``path`` is written before it is renamed into place."""
    folder, name = osp.split(path)
    return osp.join(folder, TMP_PATTERN.format(name))


def _fsync(path: str) -> None:
    """Flush ``path`` (a file or, on POSIX, a folder) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp_path: str, path: str) -> None:
    """Move the complete file ``tmp_path`` to ``path`` in one step: a reader
    (or a crash) sees either the old file or the whole new one."""
    _fsync(tmp_path)
    os.replace(tmp_path, path)
    if os.name == 'posix':
        _fsync(osp.dirname(osp.abspath(path)))


def write_text_atomically(path: str, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, then rename it."""
    tmp_path = temporary_path(path)
    with open(tmp_path, 'w') as f:
        f.write(text)
    replace_durably(tmp_path, path)


def remove_temporary_files(folder: str) -> None:
    """Remove what saves killed midway left in ``folder``."""
    for path in glob.glob(osp.join(folder, TMP_PATTERN.format('*'))):
        os.remove(path)


@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """mmengine's ``CheckpointHook`` with saves that a kill cannot break.

    Each checkpoint is written to a temporary file in the same folder,
    flushed to the disk and renamed into place; then ``last_checkpoint`` is
    replaced the same way, and only then are checkpoints beyond
    ``max_keep_ckpts`` removed. At any moment the work dir holds a complete
    checkpoint that ``last_checkpoint`` names (once one was saved). The
    temporary file of a failed save is removed at once, those of a killed
    save before training (e.g. when resuming). Only the main process
    writes, renames and removes files.

    A kill between the rename and the removal leaves one checkpoint more
    than ``max_keep_ckpts``. The best checkpoints of ``save_best`` (not
    needed to resume) are written as by mmengine. With a remote store
    (``backend_args`` / ``file_client_args`` naming a non-local backend),
    saves are mmengine's: renames are not atomic there.

    Args:
        **kwargs: Arguments of mmengine's ``CheckpointHook``.
    """

    def before_train(self, runner: Runner) -> None:
        """Set up as mmengine does; remove leftovers of a killed save."""
        super().before_train(runner)
        backend = getattr(self.file_backend, 'client', self.file_backend)
        self.atomic = isinstance(backend, LocalBackend)
        if self.atomic and is_main_process():
            for folder in {self.out_dir, runner.work_dir}:
                remove_temporary_files(folder)

    def _save_checkpoint_with_step(self, runner: Runner, step: int,
                                   meta: dict) -> None:
        """Save checkpoint ``step`` atomically, then drop the old ones."""
        if not self.atomic:
            super()._save_checkpoint_with_step(runner, step, meta)
            return
        outdated = self._keep(runner, step)
        self.last_ckpt = osp.join(self.out_dir,
                                  self.filename_tmpl.format(step))
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        tmp_path = temporary_path(self.last_ckpt)
        try:
            runner.save_checkpoint(
                osp.dirname(tmp_path),
                osp.basename(tmp_path),
                file_client_args=self.file_client_args,
                save_optimizer=self.save_optimizer,
                save_param_scheduler=self.save_param_scheduler,
                meta=meta,
                by_epoch=self.by_epoch,
                backend_args=self.backend_args,
                **self.args)
        except BaseException:
            if osp.isfile(tmp_path) and is_main_process():
                os.remove(tmp_path)
            raise
        if not is_main_process():
            return
        replace_durably(tmp_path, self.last_ckpt)
        write_text_atomically(
            osp.join(runner.work_dir, LAST_CHECKPOINT), self.last_ckpt)
        for old_step in outdated:
            self._remove_checkpoint(old_step)

    def _keep(self, runner: Runner, step: int) -> List[int]:
        """Record ``step`` among the kept checkpoints (in the message hub, so
        that the saved checkpoint and a resumed run know them); return the
        steps that fall out, to remove once the new checkpoint is saved."""
        if self.max_keep_ckpts <= 0 or (self.keep_ckpt_ids
                                        and self.keep_ckpt_ids[-1] == step):
            return []
        outdated = []
        if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
            outdated.append(self.keep_ckpt_ids.popleft())
        self.keep_ckpt_ids.append(step)
        runner.message_hub.update_info('keep_ckpt_ids',
                                       list(self.keep_ckpt_ids))
        return outdated

    def _remove_checkpoint(self, step: int) -> None:
        path = osp.join(self.out_dir, self.filename_tmpl.format(step))
        if self.file_backend.isfile(path):
            self.file_backend.remove(path)
        elif self.file_backend.isdir(path):
            self.file_backend.rmtree(path)
