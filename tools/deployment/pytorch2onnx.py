"""Export a backbone (mmdet configs) or a whole segmentor (mmseg configs) to
ONNX and check it in ONNX Runtime.

    python tools/deployment/pytorch2onnx.py CONFIG [CHECKPOINT] \\
        --shape 512 512 [--dynamic] [--out model.onnx]

The graph takes normalised images ``(1, 3, H, W)`` (the data preprocessor is
not part of it) and returns the backbone's feature maps ``out0``, ``out1``,
... (one per ``out_indices`` entry) or the segmentor's logits (``tensor``
mode). Without a checkpoint
the weights are random (a warning says so); nothing is downloaded. ONNX
Runtime must give PyTorch's outputs within 1e-4 (with ``--dynamic`` also at
a second, larger size); the latency of both on the same input is printed.
The directory of ``--out`` is created if missing; the file is written only
whole. Needs the deploy extra: ``pip install -e '.[deploy]'``. Exit status:
0 if the outputs agree, 1 if not (or the export fails), 2 if an argument is
unusable (a CONFIG or CHECKPOINT that is not a file, an ``--out`` that cannot
be written, a size or count that is not positive) or the deploy extra is
missing, which is reported before anything is built, exported or created.
"""
import argparse
import os.path as osp
import sys
from typing import Optional, Sequence

import torch

import agent_mm  # noqa: F401  (registers the backbones)
from agent_mm.deploy import (OrtRunError, build_export_model, check_onnx,
                             check_shapes, export_onnx, require_deploy_extra)
from agent_mm.deploy.onnx import (TOLERANCE, check_checkpoint, check_output,
                                  require_dynamic_export)
from agent_mm.engine.runtime import add_cfg_options, config_from_file


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Export to ONNX and check it in ONNX Runtime',
        epilog='Exit status: 0 if ONNX Runtime agrees with PyTorch, 1 if '
        'not, 2 if an argument is unusable.')
    parser.add_argument('config', help='mmdet or mmseg config file')
    parser.add_argument(
        'checkpoint',
        nargs='?',
        help='checkpoint of the whole model (default: random weights)')
    parser.add_argument(
        '--shape',
        nargs=2,
        type=int,
        required=True,
        metavar=('H', 'W'),
        help='input height and width')
    parser.add_argument(
        '--dynamic',
        action='store_true',
        help='height and width as dynamic dimensions of the graph')
    parser.add_argument(
        '--out',
        help='ONNX file (default: the config name with .onnx); its '
        'directory is created if missing')
    parser.add_argument(
        '--repeats',
        type=int,
        default=10,
        help='timed runs of ONNX Runtime and of PyTorch (median); 0: no '
        'timing')
    parser.add_argument(
        '--threads',
        type=int,
        help='threads of both ONNX Runtime and PyTorch (default: '
        "PyTorch's); 1 gives steadier numbers on a busy machine")
    add_cfg_options(parser, 'model.backbone.arch=small')
    args = parser.parse_args(argv)
    if not args.out:
        args.out = osp.splitext(osp.basename(args.config))[0] + '.onnx'
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser,
               args: argparse.Namespace) -> None:
    """Exit through ``parser.error`` (status 2), before the export's work, if
    the deploy extra is missing, ``--dynamic`` cannot be exported by this
    PyTorch, the config or checkpoint is not a file, the
    ONNX file cannot be written, or a size or count is not positive."""
    try:
        require_deploy_extra()
        if args.dynamic:
            require_dynamic_export()
    except (ImportError, RuntimeError) as err:
        parser.error(str(err))
    if not osp.isfile(args.config):
        parser.error(f'config {args.config!r} is not a file')
    if min(args.shape) < 1:
        parser.error(f'--shape must be positive, got {args.shape[0]} '
                     f'{args.shape[1]}')
    if args.threads is not None and args.threads < 1:
        parser.error(f'--threads must be positive, got {args.threads}')
    if args.repeats < 0:
        parser.error(f'--repeats must be 0 (no timing) or more, got '
                     f'{args.repeats}')
    if args.checkpoint:
        try:
            check_checkpoint(args.checkpoint)
        except FileNotFoundError as err:
            parser.error(str(err))
    try:
        check_output(args.out)
    except OSError as err:
        parser.error(f'--out: {err}')


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Export, check and time; return the exit status."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = config_from_file(args.config, args.cfg_options)
    model = build_export_model(cfg, args.checkpoint)
    example = torch.randn(1, 3, *args.shape)
    names = export_onnx(model, example, args.out, dynamic=args.dynamic)
    print(f'{args.out}: {type(model).__name__} -> {", ".join(names)}; dynamo '
          f'exporter (torch.export), dynamic H, W: '
          f'{"yes" if args.dynamic else "no"}')
    sizes = check_shapes(args.shape, args.dynamic)
    passed = [
        report(model, args.out,
               example if i == 0 else torch.randn(1, 3, *size),
               args.repeats if i == 0 else 0)
        for i, size in enumerate(sizes)
    ]
    return int(not all(passed))


def report(model: torch.nn.Module, path: str, inputs: torch.Tensor,
           repeats: int) -> bool:
    """Check (and time) the graph on ``inputs``, print the result; return
    whether ONNX Runtime agrees with PyTorch."""
    shape = 'x'.join(map(str, inputs.shape))
    try:
        check = check_onnx(model, path, inputs, repeats)
    except OrtRunError as err:
        print(f'input {shape}: FAILED, ONNX Runtime cannot run the graph: '
              f'{err}')
        return False
    verdict = 'ok' if check.ok else f'FAILED (> {TOLERANCE:g})'
    print(f'input {shape}: max |ONNX Runtime - PyTorch| = '
          f'{check.max_error:.2e} {verdict}')
    if check.ratio is not None:
        print(f'latency: ONNX Runtime {check.ort_ms:.1f} ms, PyTorch eager '
              f'{check.eager_ms:.1f} ms, ORT/eager {check.ratio:.2f}')
    return check.ok


if __name__ == '__main__':
    sys.exit(main())
