"""Evaluate a checkpoint with an agent_mm (or any mmdet/mmseg) config.

Checkpoints saved by mmdet 2.x / mmseg 0.x (as the authors released them)
load as they are: their weight names are those of mmdet 3.x / mmseg 1.x.
Usable directly, with ``tools/dist_test.sh`` / ``tools/slurm_test.sh``, or as
``mim test agent_mm CONFIG --checkpoint CKPT``.
"""
import argparse
import os.path as osp
from typing import Optional, Sequence

from mmengine.config import Config

from agent_mm.engine.runtime import (add_common_args, add_feature_autocast,
                                     build_runner, has_accelerator,
                                     load_config)
from agent_mm.utils import keep_freed_memory


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Test a model (mmdet or mmseg config)')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--out', help='dump the predictions to this .pkl file')
    parser.add_argument(
        '--show-dir',
        help='save images with predictions drawn into this directory, '
        'relative to the work dir (mmdet writes into '
        'WORK_DIR/TIMESTAMP/SHOW_DIR, mmseg into '
        'WORK_DIR/SHOW_DIR/vis_data/vis_image)')
    parser.add_argument(
        '--show', action='store_true', help='show predictions in a window')
    parser.add_argument(
        '--wait-time', type=float, default=2, help='seconds per image shown')
    parser.add_argument(
        '--amp',
        action='store_true',
        help='mixed precision: the backbone and neck in bfloat16 on the CPU, '
        'the whole model in fp16 on a GPU (a CPU without native bfloat16, '
        'AVX512-BF16 or AMX, emulates it, several times slower than float32: '
        'the log warns)')
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
        parser.error(f'--out must name a .pkl or .pickle file, got '
                     f'{args.out!r}')
    return args


def enable_visualization(cfg: Config, args: argparse.Namespace) -> None:
    """Draw predictions through the config's visualization hook."""
    hook = cfg.get('default_hooks', {}).get('visualization')
    if hook is None:
        raise ValueError('--show/--show-dir need a visualization hook in '
                         'default_hooks (mmdet: DetVisualizationHook, '
                         'mmseg: SegVisualizationHook).')
    hook['draw'] = True
    if args.show:
        hook['show'] = True
        hook['wait_time'] = args.wait_time
    if args.show_dir:
        if cfg.get('default_scope') == 'mmseg':
            cfg.visualizer['save_dir'] = osp.join(cfg.work_dir,
                                                  args.show_dir)
        else:
            hook['test_out_dir'] = args.show_dir


def enable_test_amp(cfg: Config) -> None:
    """Mixed-precision inference: on a GPU mmengine's test loop autocasts
    the whole model to fp16; on the CPU :class:`FeatureAutocastHook` runs
    the backbone and neck in bfloat16 (mmcv's CPU ops need float32), also
    where the config's own hook would not."""
    if has_accelerator():
        cfg.test_cfg = dict(cfg.get('test_cfg') or {}, fp16=True)
    else:
        add_feature_autocast(cfg, replace=True)


def build_config(args: argparse.Namespace) -> Config:
    """The config file with the command line applied."""
    cfg = load_config(args)
    cfg.load_from = args.checkpoint
    if args.amp:
        enable_test_amp(cfg)
    if args.show or args.show_dir:
        enable_visualization(cfg, args)
    if args.out is not None:
        cfg.test_evaluator = [
            *(cfg.test_evaluator if isinstance(cfg.test_evaluator, list) else
              [cfg.test_evaluator]),
            dict(type='DumpResults', out_file_path=args.out)
        ]
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the test loop; returns its metrics. Freed memory stays in the
    process for the next batches (:func:`keep_freed_memory`)."""
    cfg = build_config(parse_args(argv))
    keep_freed_memory()
    return build_runner(cfg).test()


if __name__ == '__main__':
    main()
