"""Benchmark the agent backbones against mmdet's PVT and Swin, and the fast
agent-attention path against the reference one.

For every model and input size it reports forward latency (eval, no_grad),
peak memory, parameters and FLOPs, and forward+backward latency and peak
memory in train mode, plus the scaling of Agent-PVT-T's forward time with
the input size (its two sizes alternating) and the project's target ratios.
With ``--dtype float32 bfloat16`` every measurement is also made with the
forward under ``torch.autocast``, the precisions' calls interleaved with the
models', and the report gives the bf16 / fp32 time. Every eval row also
gets its share of the GEMM roofline, against a ``--matmul-size``³ product
(2048³ by default) timed in the same rounds.
How each quantity is measured: :mod:`agent_mm.benchmark.measure`; the
measuring, the targets and the report live in :mod:`agent_mm.benchmark`,
this file is the command line.

Example::

    python tools/analysis_tools/benchmark_backbones.py --repeats 3
    python tools/analysis_tools/benchmark_backbones.py --sizes 64 96x128 \
        --train-sizes 64 --scaling-sizes 64 128 --repeats 1 --warmup 0 \
        --dtype float32 bfloat16
"""
import argparse
import os
import os.path as osp
from functools import partial
from typing import Optional, Sequence, Tuple

from agent_mm.benchmark.cli import (add_dtype_option, add_host_options,
                                    add_matmul_size_option, check_dtype_option,
                                    parse_size)
from agent_mm.benchmark.models import MODELS
from agent_mm.benchmark.report import save_json, write_report
from agent_mm.benchmark.run import Settings, run
from agent_mm.benchmark.targets import TARGET_SCALING

# 800x1344: a COCO test image (resized to 1333x800) as mmdet's pipeline
# hands it to the backbone, padded to 32; the Agent-Swin-T target's size
DEFAULT_SIZES = ('512', '1024', '1536', '2048', '800x1344')


def parse_limit(text: str) -> Tuple[str, int]:
    """``'pvt_s=147456'`` → ``('pvt_s', 147456)``."""
    model, _, tokens = text.partition('=')
    if model not in MODELS or not tokens.isdigit():
        raise argparse.ArgumentTypeError(
            f'expected MODEL=TOKENS with MODEL in {list(MODELS)}, got '
            f'{text!r}')
    return model, int(tokens)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line's options (``argv``: None for ``sys.argv``)."""
    parser = argparse.ArgumentParser(
        description='Benchmark agent backbones vs mmdet PVT/Swin and the '
        'fast vs reference agent attention.')
    parser.add_argument(
        '--sizes',
        nargs='+',
        type=parse_size,
        default=[parse_size(s) for s in DEFAULT_SIZES],
        help='eval input sizes, N or HxW (default: ' +
        ' '.join(DEFAULT_SIZES) + ')')
    parser.add_argument(
        '--train-sizes',
        nargs='*',
        type=parse_size,
        default=[(512, 512)],
        help='fwd+bwd input sizes; none to skip training')
    parser.add_argument('--batch', type=int, default=1, help='eval batch')
    parser.add_argument(
        '--train-batch', type=int, default=2, help='fwd+bwd batch')
    parser.add_argument(
        '--repeats', type=int, default=5, help='timed calls per model')
    parser.add_argument(
        '--warmup',
        type=int,
        default=1,
        help='untimed calls of a model right before each timed one; with '
        '0, a fast model\'s first timed calls also build its bias maps')
    parser.add_argument(
        '--models',
        nargs='+',
        choices=list(MODELS),
        default=list(MODELS),
        metavar='MODEL',
        help='models to run, from ' + ', '.join(MODELS) + ' (default: all)')
    add_dtype_option(parser)
    parser.add_argument('--device', default='cpu', help='cpu or cuda[:i]')
    add_host_options(parser)
    add_matmul_size_option(parser)
    parser.add_argument(
        '--flops-max-peak-mb',
        type=float,
        help='skip FLOP counting of a model whose measured forward peak '
        'memory exceeds this; tracing needs ~1.6× a forward\'s memory, '
        'e.g. ~20 GB for mmdet PVT at 2048² (default: count all)')
    parser.add_argument(
        '--max-tokens',
        nargs='+',
        type=parse_limit,
        default=[],
        metavar='MODEL=TOKENS',
        help='skip MODEL at inputs of more tokens (H·W/16), e.g. '
        'pvt_t=147456 pvt_s=147456 keeps mmdet PVT, whose stage-1 '
        'attention is quadratic, below 2048² (~20 GB there)')
    parser.add_argument(
        '--scaling-sizes',
        nargs='*',
        type=parse_size,
        default=list(TARGET_SCALING),
        metavar='SIZE',
        help='two eval sizes at which Agent-PVT-T (fast) is timed '
        'alternately for the scaling ratio (default: 1024 2048); none to '
        'skip')
    parser.add_argument(
        '--out-dir',
        default=osp.join('work_dirs', 'benchmark'),
        help='where benchmark.md/.json/latency_vs_tokens.png go')
    args = parser.parse_args(argv)
    check_dtype_option(parser, args)
    if args.repeats < 1 or args.warmup < 0:
        parser.error('--repeats must be ≥ 1 and --warmup ≥ 0')
    scaling = args.scaling_sizes
    if len(scaling) not in (0, 2) or len(set(scaling)) < len(scaling):
        parser.error('--scaling-sizes takes two different sizes (or none to '
                     f'skip), got {len(scaling)}')
    return args


def settings_of(args: argparse.Namespace) -> Settings:
    """The run's settings from the parsed options."""
    options = {
        name: value
        for name, value in vars(args).items() if name != 'out_dir'
    }
    return Settings(**dict(options, max_tokens=dict(args.max_tokens)))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the benchmark, write its report to ``--out-dir`` and print the
    markdown; returns the results also written to JSON."""
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    results = run(
        settings_of(args), on_update=partial(save_json, out_dir=args.out_dir))
    print(write_report(results, args.out_dir))
    return results


if __name__ == '__main__':
    main()
