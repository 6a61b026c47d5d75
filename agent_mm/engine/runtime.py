"""What the tools share: their config loading and command-line options
(all of them), and the runner set-up of ``tools/train.py`` and
``tools/test.py``."""
import argparse
import os
import os.path as osp
import subprocess
from typing import Any, Dict, Mapping, Optional

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


DEFAULT_MASTER_PORT = '29500'  # torch.distributed's
# per launcher: the command that starts the processes, and the variables it
# gives each of them for torch's RANK, WORLD_SIZE and LOCAL_RANK
LAUNCHER_RANKS = {
    'slurm': ('srun', ('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_LOCALID')),
    'mpi': ('mpirun', ('OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_SIZE',
                       'OMPI_COMM_WORLD_LOCAL_RANK')),
}


def slurm_master_address(node_list: str) -> str:
    """The first host of a Slurm node list, as ``scontrol`` expands it."""
    try:
        hosts = subprocess.run(['scontrol', 'show', 'hostnames', node_list],
                               capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as error:
        raise RuntimeError(
            f'cannot expand SLURM_NODELIST={node_list!r} with scontrol '
            f'({error}); set MASTER_ADDR to the first node\'s address') from (
                error)
    return hosts[0]


def launcher_env(launcher: str, environ: Mapping[str, str]) -> Dict[str, str]:
    """torch.distributed's ``env://`` variables (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) from those Slurm
    (``srun``) or Open MPI (``mpirun``) give each process, as mmengine's
    launchers read them; ``MASTER_ADDR`` and ``MASTER_PORT`` are kept where
    set, and a Slurm job's first node is the master otherwise."""
    command, names = LAUNCHER_RANKS[launcher]
    if 'MASTER_ADDR' not in environ:
        if launcher == 'mpi':
            raise RuntimeError('--launcher mpi needs MASTER_ADDR, the '
                               'address of the rank 0 process, in the '
                               'environment')
        names += ('SLURM_NODELIST', )  # the master is its first node
    missing = [name for name in names if name not in environ]
    if missing:
        raise RuntimeError(
            f'--launcher {launcher} needs {", ".join(missing)} in the '
            f'environment: start the processes with {command}')
    env = dict(zip(('RANK', 'WORLD_SIZE', 'LOCAL_RANK'),
                   (environ[name] for name in names)))
    return dict(
        env,
        MASTER_ADDR=environ['MASTER_ADDR'] if 'MASTER_ADDR' in environ else
        slurm_master_address(environ['SLURM_NODELIST']),
        MASTER_PORT=environ.get('MASTER_PORT', DEFAULT_MASTER_PORT))


def init_cpu_distributed(cfg: Config) -> None:
    """Join the launcher's process group with gloo: torchrun's, or that of
    the processes ``srun`` or ``mpirun`` started (:func:`launcher_env`).

    mmengine's own initialisation calls ``torch.cuda.set_device``, which a
    CPU-only torch does not have; once the group exists, mmengine uses it.
    """
    launcher = cfg.get('launcher', 'none')
    if launcher == 'none' or has_accelerator() or dist.is_initialized():
        return
    if launcher != 'pytorch':
        os.environ.update(launcher_env(launcher, os.environ))
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
    """Mixed-precision training: mmengine's ``AmpOptimWrapper`` with
    dynamic loss scaling on a GPU, in fp16 or the ``dtype`` the config's
    wrapper names, as mmengine's own tools do (the CPU wrapper's
    ``native_only`` dropped). On the CPU, a detector's backbone and neck
    run in bfloat16 through a ``FeatureAutocastHook`` (the config's own if
    it has one), since mmcv's CPU NMS and RoIAlign take float32 only and a
    two-stage detector's RPN calls NMS in training; other models train
    under :class:`~.optim_wrapper.CPUAmpOptimWrapper` (bfloat16 autocast
    over the whole forward)."""
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
    (:class:`CheckpointMatchHook`: the config's own, if it has one, else
    one added); ``partial_load=True`` in ``cfg`` (``--partial-load``) makes
    either only warn."""
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    init_cpu_distributed(cfg)
    runner = RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(
        cfg)
    matchers = [
        hook for hook in runner.hooks if isinstance(hook, CheckpointMatchHook)
    ]
    if not matchers:
        matchers = [CheckpointMatchHook()]
        runner.register_hook(matchers[0])
    if cfg.get('partial_load', False):
        for hook in matchers:
            hook.partial_load = True
    return runner
