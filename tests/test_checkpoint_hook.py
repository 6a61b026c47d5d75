"""AtomicCheckpointHook and the ``--resume`` fallback: checkpoints survive a
save that fails or is killed midway, with ``max_keep_ckpts=1`` too."""
import glob
import logging
import os.path as osp
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace
from uuid import uuid4

import pytest
import torch
from checkpoint_faults import halfway_put
from mmengine.config import Config
from mmengine.fileio import LocalBackend
from mmengine.logging import MMLogger
from mmengine.registry import DATASETS, HOOKS, METRICS, MODELS
from mmengine.runner import Runner
from mmengine.testing.runner_test_case import ToyDataset, ToyMetric, ToyModel
from test_train_tools import QUICKSTART_SEG, _train, _write_config
from tiny_configs import DET_CONFIG, DET_OVERRIDES, tiny_config

import agent_mm  # noqa: F401  (registers the hook)
from agent_mm.engine import AtomicCheckpointHook
from agent_mm.engine.resume import ResumeFallbackHook, find_resume_checkpoint

REPO = Path(__file__).resolve().parents[1]
FAULTS = osp.join(osp.dirname(osp.abspath(__file__)), 'checkpoint_faults.py')
sys.path.insert(0, str(REPO / 'tools'))
import train as train_tool  # noqa: E402


@pytest.fixture(autouse=True, scope='module')
def _toy_modules():
    """mmengine's toy model, data set and metric for in-process runners,
    registered while this module's tests run."""
    toys = ((MODELS, ToyModel), (DATASETS, ToyDataset), (METRICS, ToyMetric))
    for registry, module in toys:
        registry.register_module(module=module, force=True)
    yield
    for registry, module in toys:
        registry.module_dict.pop(module.__name__, None)


def _toy_runner(work_dir, checkpoint: dict, by_epoch=False, length=3,
                **extra) -> Runner:
    """A runner of the toy model saving with :class:`AtomicCheckpointHook`
    every iteration (or epoch) for ``length`` iterations (or epochs)."""
    loader = dict(
        dataset=dict(type='ToyDataset'),
        sampler=dict(
            type='DefaultSampler' if by_epoch else 'InfiniteSampler',
            shuffle=False),
        batch_size=3,
        num_workers=0)
    steps = dict(max_epochs=length) if by_epoch else dict(max_iters=length)
    cfg = Config(
        dict(
            model=dict(type='ToyModel'),
            work_dir=str(work_dir),
            experiment_name=f'atomic_{uuid4().hex}',
            train_dataloader=loader,
            optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
            train_cfg=dict(by_epoch=by_epoch, **steps),
            default_hooks=dict(
                checkpoint=dict(
                    type='AtomicCheckpointHook',
                    by_epoch=by_epoch,
                    interval=1,
                    **checkpoint)),
            **extra))
    return Runner.from_cfg(cfg)


def _files(work_dir) -> list:
    """Checkpoints and temporary files in ``work_dir`` (hidden ones too)."""
    return sorted(
        osp.basename(path)
        for path in glob.glob(osp.join(work_dir, '*.pth*')) +
        glob.glob(osp.join(work_dir, '.*')))


def _recorded(work_dir) -> str:
    return (Path(work_dir) / 'last_checkpoint').read_text()


def _meta(path) -> dict:
    assert zipfile.is_zipfile(path), path
    return torch.load(path)['meta']


@pytest.mark.parametrize('keep', [1, 3])
def test_keeps_the_newest_checkpoints_and_no_temporary_file(tmp_path, keep):
    runner = _toy_runner(tmp_path, dict(max_keep_ckpts=keep), length=5)
    runner.train()
    steps = list(range(6 - keep, 6))
    assert _files(tmp_path) == sorted(f'iter_{step}.pth' for step in steps)
    assert _recorded(tmp_path) == str(tmp_path / 'iter_5.pth')
    checkpoint = torch.load(tmp_path / 'iter_5.pth')
    assert checkpoint['meta']['iter'] == 5
    # mmengine's bookkeeping, so that a resumed run removes the right files
    hub = checkpoint['message_hub']['runtime_info']
    assert hub['keep_ckpt_ids'] == steps


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):

    def disk_full():
        raise OSError('No space left on device')

    monkeypatch.setattr(LocalBackend, 'put', halfway_put(3, disk_full))
    with pytest.raises(OSError, match='No space left'):
        _toy_runner(tmp_path, dict(max_keep_ckpts=1)).train()
    monkeypatch.undo()

    assert _files(tmp_path) == ['iter_2.pth']
    previous = str(tmp_path / 'iter_2.pth')
    assert _recorded(tmp_path) == previous
    assert _meta(previous)['iter'] == 2
    assert find_resume_checkpoint(str(tmp_path)) == previous

    runner = _toy_runner(tmp_path, dict(max_keep_ckpts=1), resume=True)
    runner.train()
    assert runner.iter == 3
    assert _files(tmp_path) == ['iter_3.pth']
    assert _meta(tmp_path / 'iter_3.pth')['iter'] == 3


def test_best_checkpoint_still_saved(tmp_path):
    runner = _toy_runner(
        tmp_path,
        dict(max_keep_ckpts=1, save_best='acc'),
        by_epoch=True,
        length=2,
        val_dataloader=dict(
            dataset=dict(type='ToyDataset'),
            sampler=dict(type='DefaultSampler', shuffle=False),
            batch_size=3,
            num_workers=0),
        val_evaluator=dict(type='ToyMetric'),
        val_cfg=dict())
    runner.train()
    # the toy metric is always 1: the first epoch stays the best
    assert _files(tmp_path) == ['best_acc_epoch_1.pth', 'epoch_2.pth']
    hub = torch.load(tmp_path / 'epoch_2.pth')['message_hub']['runtime_info']
    assert hub['best_ckpt'] == str(tmp_path / 'best_acc_epoch_1.pth')
    assert _recorded(tmp_path) == str(tmp_path / 'epoch_2.pth')


def test_leftover_temporary_files_are_removed(tmp_path):
    for name in ('.iter_4.pth.tmp', '.last_checkpoint.tmp'):
        (tmp_path / name).write_bytes(b'half')
    _toy_runner(tmp_path, dict(max_keep_ckpts=1), length=1).train()
    assert _files(tmp_path) == ['iter_1.pth']


def _save(path, step: int) -> str:
    torch.save(dict(meta=dict(iter=step)), path)
    return str(path)


def _truncate(path) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:len(data) // 2])


def _collect(logger: logging.Logger, level: int) -> list:
    """The messages (a list that grows) that ``logger`` logs from ``level``
    on."""
    messages = []
    handler = logging.Handler(level)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger.addHandler(handler)
    return messages


@pytest.fixture
def current_logger() -> MMLogger:
    """A new current mmengine logger, which the resume fallback logs to."""
    return MMLogger.get_instance(f'resume_{uuid4().hex}')


@pytest.fixture
def warned(current_logger):
    """The warnings that the resume fallback logs (through the real logger,
    so that a wrong call of it fails)."""
    return _collect(current_logger, logging.WARNING)


@pytest.fixture
def logged(current_logger):
    """All that the resume fallback logs, information too."""
    return _collect(current_logger, logging.INFO)


@pytest.mark.parametrize('broken', ['missing', 'truncated'])
def test_resume_falls_back_to_newest_complete_checkpoint(
        tmp_path, warned, broken):
    _save(tmp_path / 'iter_2.pth', 2)
    newest = _save(tmp_path / 'iter_10.pth', 10)
    # a truncated one that is newer still, not named in last_checkpoint
    _truncate(_save(tmp_path / 'iter_12.pth', 12))
    recorded = tmp_path / 'iter_14.pth'
    if broken == 'truncated':
        _truncate(_save(recorded, 14))
    (tmp_path / 'last_checkpoint').write_text(str(recorded))

    assert find_resume_checkpoint(str(tmp_path)) == newest
    reason = ('does not exist'
              if broken == 'missing' else 'truncated or not a PyTorch')
    assert len(warned) == 3
    assert str(recorded) in warned[0] and reason in warned[0]
    assert 'iter_12.pth' in warned[1] and 'truncated' in warned[1]
    assert newest in warned[2]


@pytest.mark.parametrize('record', ['missing', 'empty'])
@pytest.mark.parametrize('newer', ['none', 'truncated'])
def test_resume_without_recorded_checkpoint_takes_newest_complete(
        tmp_path, warned, record, newer):
    # e.g. checkpoints copied into a new work dir, or mmengine's hook
    _save(tmp_path / 'epoch_2.pth', 2)
    complete = _save(tmp_path / 'epoch_3.pth', 3)
    if newer == 'truncated':
        _truncate(_save(tmp_path / 'epoch_4.pth', 4))
    if record == 'empty':
        (tmp_path / 'last_checkpoint').write_text('\n')

    assert find_resume_checkpoint(str(tmp_path)) == complete
    if newer == 'truncated':
        skipped = warned.pop(0)
        assert 'epoch_4.pth' in skipped and 'truncated' in skipped
    reason = 'does not exist' if record == 'missing' else 'is empty'
    assert warned == [
        f'Resuming from {complete}, the newest complete checkpoint, as '
        f'{tmp_path / "last_checkpoint"} {reason}.'
    ]


def test_resume_uses_the_recorded_checkpoint(tmp_path, warned):
    recorded = _save(tmp_path / 'iter_2.pth', 2)
    _save(tmp_path / 'iter_4.pth', 4)  # newer, but not the recorded one
    (tmp_path / 'last_checkpoint').write_text(recorded + '\n')
    assert find_resume_checkpoint(str(tmp_path)) == recorded
    assert warned == []


def test_resume_starts_from_scratch_without_complete_checkpoint(
        tmp_path, warned, logged):
    assert find_resume_checkpoint(str(tmp_path)) is None
    assert warned == []  # nothing was saved: as mmengine, but said
    assert logged == [
        f'No checkpoint in {tmp_path} to resume from: training starts from '
        'scratch.'
    ]

    _truncate(_save(tmp_path / 'epoch_1.pth', 1))
    assert find_resume_checkpoint(str(tmp_path)) is None
    assert 'epoch_1.pth' in warned[0] and 'truncated' in warned[0]
    assert 'from scratch' in warned[-1] and 'does not exist' in warned[-1]

    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'epoch_1.pth'))
    assert find_resume_checkpoint(str(tmp_path)) is None
    assert 'from scratch' in warned[-1]


@pytest.mark.parametrize('complete', [True, False])
def test_resume_fallback_hook_resumes_from_the_newest_complete_checkpoint(
        tmp_path, warned, complete):
    checkpoint = _save(tmp_path / 'iter_2.pth', 2)
    if not complete:
        _truncate(checkpoint)
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_4.pth'))
    runner = SimpleNamespace(_resume=True, _load_from=None,
                             work_dir=str(tmp_path))
    ResumeFallbackHook().before_run(runner)
    if complete:
        assert (runner._resume, runner._load_from) == (True, checkpoint)
    else:
        assert (runner._resume, runner._load_from) == (False, None)
        assert 'from scratch' in warned[-1]


def test_resume_fallback_hook_leaves_a_named_checkpoint(tmp_path):
    runner = SimpleNamespace(_resume=True, _load_from='named.pth',
                             work_dir=str(tmp_path))
    ResumeFallbackHook().before_run(runner)
    assert (runner._resume, runner._load_from) == (True, 'named.pth')


def test_train_tool_resumes_through_the_fallback_hook(tmp_path, monkeypatch):
    calls = []  # what a stand-in runner was given, in order

    def runner(cfg):
        calls.append(cfg)
        return SimpleNamespace(register_hook=calls.append,
                               train=lambda: calls.append('train'))

    monkeypatch.setattr(train_tool, 'build_runner', runner)
    train_tool.main([QUICKSTART_SEG, '--work-dir', str(tmp_path), '--resume'])
    cfg, hook, step = calls
    assert (cfg.resume, cfg.load_from) == (True, None)
    assert isinstance(hook, ResumeFallbackHook) and step == 'train'


@pytest.mark.slow
def test_resume_from_checkpoint_copied_into_new_work_dir(tmp_path):
    config = tiny_config(tmp_path, DET_CONFIG, DET_OVERRIDES)  # 1 epoch
    _train(config, tmp_path / 'first')
    work_dir = tmp_path / 'copy'
    work_dir.mkdir()
    copied = shutil.copy(tmp_path / 'first' / 'epoch_1.pth', work_dir)
    saved = Path(copied).read_bytes()

    out = _train(config, work_dir, '--resume', '--cfg-options',
                 'train_cfg.max_epochs=2')
    fallback = (f'WARNING - Resuming from {copied}, the newest complete '
                f'checkpoint, as {work_dir / "last_checkpoint"} does not '
                'exist.')
    assert fallback in out
    # also in the run's log file
    assert fallback in next(work_dir.glob('*/*.log')).read_text()
    assert 'resumed epoch: 1, iter: 2' in out
    assert 'Epoch(train) [1]' not in out and 'Epoch(train) [2]' in out
    assert Path(copied).read_bytes() == saved  # not trained again
    assert _meta(work_dir / 'epoch_2.pth')['epoch'] == 2
    assert _recorded(work_dir) == str(work_dir / 'epoch_2.pth')


# the paper's configs are checked in test_configs.py, with their recipes
OTHER_CONFIGS = sorted(
    str(path.relative_to(REPO / 'configs'))
    for path in (REPO / 'configs').glob('*/*.py')
    if path.parent.name not in ('agent_pvt', 'agent_swin'))
# (by_epoch, interval, max_keep_ckpts) of the quick-start configs
QUICKSTART_CHECKPOINTS = {
    'quickstart/fpn_agent-pvt-t_shapes.py': (False, 100, 2),
    'quickstart/mask-rcnn_agent-pvt-t_fpn_shapes.py': (True, 1, 2),
}


def test_quickstart_configs_are_all_checked():
    assert set(QUICKSTART_CHECKPOINTS) <= set(OTHER_CONFIGS)


@pytest.mark.parametrize('config', OTHER_CONFIGS)
def test_shipped_configs_use_the_atomic_hook(config):
    cfg = Config.fromfile(str(REPO / 'configs' / config))
    hook = HOOKS.build(cfg.default_hooks.checkpoint)
    assert type(hook) is AtomicCheckpointHook, (
        "add default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'"
        ')) to the config or its _base_')
    if config in QUICKSTART_CHECKPOINTS:
        assert (hook.by_epoch, hook.interval,
                hook.max_keep_ckpts) == QUICKSTART_CHECKPOINTS[config]


# a save every iteration and only the last one kept; no validation, to be
# quick
KEEP_ONE = [
    '--cfg-options', 'train_cfg.max_iters=2',
    'default_hooks.checkpoint.interval=1',
    'default_hooks.checkpoint.max_keep_ckpts=1', 'val_cfg=None',
    'val_dataloader=None', 'val_evaluator=None'
]


@pytest.mark.slow
def test_resume_after_kill_during_save(tmp_path):
    config = _write_config(tmp_path)
    work_dir = tmp_path / 'work'
    marker = tmp_path / 'half_written'
    log = tmp_path / 'killed.log'
    command = [
        sys.executable, FAULTS,
        str(marker), '2', config, '--work-dir',
        str(work_dir), *KEEP_ONE
    ]
    with open(log, 'w') as out, subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT) as process:
        try:
            deadline = time.monotonic() + 300
            while not marker.exists():
                assert process.poll() is None, log.read_text()[-4000:]
                assert time.monotonic() < deadline, 'no second save'
                time.sleep(0.2)
        finally:
            process.kill()  # SIGKILL

    # killed while iter_2.pth was half written: iter_1.pth is still there
    first = str(work_dir / 'iter_1.pth')
    assert _recorded(work_dir) == first
    assert _meta(first)['iter'] == 1
    half_written = [name for name in _files(work_dir) if name != 'iter_1.pth']
    assert half_written and not any(
        zipfile.is_zipfile(work_dir / name) for name in half_written)

    out = _train(config, work_dir, '--resume', *KEEP_ONE)
    assert 'resumed epoch: 0, iter: 1' in out
    assert _files(work_dir) == ['iter_2.pth']
    assert _recorded(work_dir) == str(work_dir / 'iter_2.pth')
    assert _meta(work_dir / 'iter_2.pth')['iter'] == 2
