"""Config adjustments shared by ``tools/train.py`` and ``tools/test.py``."""
import argparse
import os
import os.path as osp
from typing import Any, Optional

import torch
import torch.distributed as dist
from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS, init_default_scope
from mmengine.runner import Runner
from mmengine.utils import import_modules_from_strings

from .checkpoint_match import CheckpointMatchHook
from .feature_autocast import FeatureAutocastHook


def has_accelerator() -> bool:
    """Whether a CUDA device can be used."""
    return torch.cuda.is_available()


def set_work_dir(cfg: Config, config_path: str,
                 work_dir: Optional[str]) -> None:
    """Work dir priority: command line, config, ``work_dirs/<config
    name>``."""
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(config_path))[0])


def replace_sync_bn(node: Any) -> Any:
    """Turn every ``SyncBN`` norm config into ``BN`` (in place).

    torch's ``SyncBatchNorm`` refuses CPU tensors in distributed training,
    so CPU runs use plain batch norm (per-process statistics).
    """
    if isinstance(node, dict):
        if node.get('type') == 'SyncBN':
            node['type'] = 'BN'
        for value in node.values():
            replace_sync_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            replace_sync_bn(value)
    return node


def adapt_to_cpu(cfg: Config) -> None:
    """Make a GPU-minded config run on CPU processes: ``BN`` instead of
    ``SyncBN``, and for distributed runs gloo instead of nccl and a DDP
    wrapper without device ids."""
    if has_accelerator():
        return
    replace_sync_bn(cfg.model)
    if cfg.get('launcher', 'none') == 'none':
        return
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})
    cfg.env_cfg.dist_cfg['backend'] = 'gloo'
    if cfg.get('model_wrapper_cfg') is None:
        cfg.model_wrapper_cfg = dict(
            type='CPUDistributedDataParallel',
            broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))


def init_cpu_distributed(cfg: Config) -> None:
    """Join the torchrun process group with gloo.

    mmengine's own initialisation calls ``torch.cuda.set_device``, which a
    CPU-only torch does not have; once the group exists, mmengine uses it.
    """
    if (cfg.get('launcher') == 'pytorch' and not has_accelerator()
            and not dist.is_initialized()):
        dist.init_process_group(backend='gloo')


def is_detector(cfg: Config) -> bool:
    """Whether ``cfg`` builds in mmdet's scope (the one :func:`build_runner`
    defaults to)."""
    return cfg.get('default_scope', 'mmdet') == 'mmdet'


def add_feature_autocast(cfg: Config, replace: bool) -> None:
    """Run the backbone and neck in bfloat16 on the CPU: add a bfloat16
    FeatureAutocastHook to ``cfg``'s custom hooks, after any the config has
    (which it overrides) if ``replace``, else only where the config has
    none."""
    hooks = cfg.get('custom_hooks', [])
    name = FeatureAutocastHook.__name__
    if replace or not any(hook.get('type') == name for hook in hooks):
        cfg.custom_hooks = [*hooks, dict(type=name, dtype='bfloat16')]


def enable_amp(cfg: Config) -> None:
    """Mixed-precision training: mmengine's ``AmpOptimWrapper`` (fp16 with
    dynamic loss scaling) on a GPU, the other wrapper's own options
    dropped. On the CPU, a detector's backbone and neck run in bfloat16
    through a ``FeatureAutocastHook`` (the config's own if it has one),
    since mmcv's CPU NMS and RoIAlign take float32 only and a two-stage
    detector's RPN calls NMS in training; other models train under
    :class:`~.optim_wrapper.CPUAmpOptimWrapper` (bfloat16 autocast over
    the whole forward)."""
    if has_accelerator():
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
        cfg.optim_wrapper.pop('native_only', None)
    elif is_detector(cfg):
        add_feature_autocast(cfg, replace=False)
    else:
        cfg.optim_wrapper.type = 'CPUAmpOptimWrapper'
        cfg.optim_wrapper.pop('loss_scale', None)


def add_cfg_options(parser: argparse.ArgumentParser, example: str) -> None:
    """``--cfg-options key=value ...``, read by :func:`config_from_file`;
    ``example`` is one such setting, for the help text."""
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help=f'override config settings, e.g. {example}')


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by the train and test tools."""
    parser.add_argument('--work-dir', help='where to save logs and outputs')
    add_cfg_options(parser, 'train_cfg.max_epochs=2')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    parser.add_argument(
        '--partial-load',
        action='store_true',
        help='load a checkpoint whose weights only partly match the model '
        '(warn instead of failing)')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def config_from_file(path: str, options: Optional[dict] = None) -> Config:
    """The config file ``path`` with ``options`` (``--cfg-options``)
    merged in, and the modules its ``custom_imports`` names imported, those
    the options add included: ``Config.fromfile`` imports the file's own
    before any option is merged, and would leave the others out without a
    word."""
    cfg = Config.fromfile(path)
    if options:
        cfg.merge_from_dict(options)
        if cfg.get('custom_imports'):
            import_modules_from_strings(**cfg.custom_imports)
    return cfg


def load_config(args: argparse.Namespace) -> Config:
    """The config file with the shared command-line options applied."""
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    cfg = config_from_file(args.config, args.cfg_options)
    cfg.launcher = args.launcher
    if args.partial_load:
        cfg.partial_load = True
    set_work_dir(cfg, args.config, args.work_dir)
    adapt_to_cpu(cfg)
    return cfg


def build_runner(cfg: Config) -> Runner:
    """A runner in the config's codebase scope (mmdet or mmseg) that refuses
    checkpoints whose weights do not match the model
    (:class:`CheckpointMatchHook`, unless the config has one)."""
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    init_cpu_distributed(cfg)
    runner = RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(
        cfg)
    if not any(isinstance(hook, CheckpointMatchHook) for hook in runner.hooks):
        runner.register_hook(
            CheckpointMatchHook(partial_load=cfg.get('partial_load', False)))
    return runner
