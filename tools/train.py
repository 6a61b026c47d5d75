"""Train a detector or segmentor with an agent_mm (or any mmdet/mmseg)
config.

The codebase is taken from the config's ``default_scope`` (``mmdet`` or
``mmseg``), so one script serves both. Usable directly, with
``tools/dist_train.sh`` / ``tools/slurm_train.sh``, or as
``mim train agent_mm CONFIG``.
"""
import argparse
from typing import Optional, Sequence

from mmengine.config import Config

from agent_mm.engine.resume import ResumeFallbackHook
from agent_mm.engine.runtime import (add_common_args, build_runner, enable_amp,
                                     load_config)
from agent_mm.utils import keep_freed_memory


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Train a model (mmdet or mmseg config)')
    parser.add_argument('config', help='train config file path')
    parser.add_argument(
        '--amp',
        action='store_true',
        help='mixed precision: fp16 on a GPU (or the optim_wrapper\'s '
        'dtype); bfloat16 on the CPU, for a '
        'detector in its backbone and neck (mmcv\'s CPU NMS and RoIAlign '
        'take float32; the config\'s FeatureAutocastHook if it has one), '
        'for other models over the whole forward. Float32 where the '
        'config\'s hook or CPUAmpOptimWrapper has native_only=True and the '
        'CPU has no native bfloat16; without it such a CPU emulates '
        'bfloat16, several times slower, and the log warns')
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='scale the learning rate with the actual total batch size')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='resume from this checkpoint, or (no value) from the latest '
        'checkpoint in the work dir (the newest complete one if the latest '
        'is missing or truncated)')
    add_common_args(parser)
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    """The config file with the command line applied."""
    cfg = load_config(args)
    if args.amp:
        enable_amp(cfg)
    if args.auto_scale_lr:
        if 'base_batch_size' not in (cfg.get('auto_scale_lr') or {}):
            raise ValueError('--auto-scale-lr needs auto_scale_lr='
                             'dict(base_batch_size=...) in the config.')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run the training loop. Freed memory stays in the process for the
    next steps (:func:`keep_freed_memory`)."""
    cfg = build_config(parse_args(argv))
    keep_freed_memory()
    runner = build_runner(cfg)
    # resume: the checkpoint last_checkpoint names, or the newest complete one
    runner.register_hook(ResumeFallbackHook())
    runner.train()


if __name__ == '__main__':
    main()
