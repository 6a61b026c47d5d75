"""Profile eval forwards of the benchmark's backbones, grouped by op family.

For every model, input size and precision, torch.profiler records warm eval
forwards; the self CPU time of the aten ops is grouped into families (GEMM,
convolution, softmax, normalisation, layout/copy, ...) and each family is
set against its floor: its FLOPs at the matmul rate and its estimated bytes
at the copy bandwidth, both measured in the same process. The method and
its approximations: :mod:`agent_mm.benchmark.profile`; this file is the
command line. Writes ``--out`` (markdown) and the JSON beside it, and prints
the markdown.

Example::

    python tools/analysis_tools/profile_backbones.py agent_pvt_t pvt_t \
        --sizes 1024 800x1333 --dtype float32 bfloat16 \
        --out docs/benchmark/profile.md

``--alone 3`` also times every op of one more forward in it and alone
(:mod:`agent_mm.benchmark.ops_alone`): whether the forward runs its
kernels at their own speed.
"""
import argparse
import os
import os.path as osp
from typing import Optional, Sequence

from agent_mm.benchmark.cli import (add_dtype_option, add_host_options,
                                    add_matmul_size_option, check_dtype_option,
                                    parse_size)
from agent_mm.benchmark.models import MODELS
from agent_mm.benchmark.profile import (ProfileSettings, require_event_dtypes,
                                        run_profiles, write_profile)

DEFAULT_SIZES = ('1024', '800x1333')
POSITIVE = ('batch', 'calls', 'copy_mb')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line's options (``argv``: None for ``sys.argv``)."""
    parser = argparse.ArgumentParser(
        description='Profile eval forwards of the benchmarked backbones, '
        'self CPU time by op family against each family\'s floor.')
    parser.add_argument(
        'models',
        nargs='+',
        choices=list(MODELS),
        metavar='MODEL',
        help='models to profile, from ' + ', '.join(MODELS))
    parser.add_argument(
        '--sizes',
        nargs='+',
        type=parse_size,
        default=[parse_size(s) for s in DEFAULT_SIZES],
        help='input sizes, N or HxW (default: ' + ' '.join(DEFAULT_SIZES) +
        ')')
    add_dtype_option(parser)
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument(
        '--warmup',
        type=int,
        default=2,
        help='untimed forwards before each profile (default 2: the bias '
        'cache keeps a shape from its second forward on)')
    parser.add_argument(
        '--calls',
        type=int,
        default=1,
        help='profiled forwards per model, size and dtype, averaged')
    add_host_options(parser)
    add_matmul_size_option(parser)
    parser.add_argument(
        '--copy-mb',
        type=int,
        default=256,
        help='MB of the tensor copy timed for the memory bandwidth')
    parser.add_argument(
        '--alone',
        type=int,
        default=0,
        metavar='REPEATS',
        help='also time every op of one more forward in it and re-run '
        'alone on copies of its arguments, REPEATS times (median); 0 '
        '(default) for not')
    parser.add_argument(
        '--out',
        default=osp.join('work_dirs', 'profile', 'profile.md'),
        help='the markdown report; the JSON goes beside it')
    args = parser.parse_args(argv)
    check_dtype_option(parser, args)
    if min(args.warmup, args.alone) < 0 or min(
            getattr(args, name) for name in POSITIVE) < 1:
        parser.error('--warmup and --alone must be ≥ 0 and --batch, '
                     '--calls, --matmul-size and --copy-mb ≥ 1')
    try:
        require_event_dtypes()
    except RuntimeError as err:
        parser.error(str(err))
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Profile, write the report and print it; returns the results."""
    args = parse_args(argv)
    options = {
        name: value
        for name, value in vars(args).items() if name != 'out'
    }
    os.makedirs(osp.dirname(args.out) or '.', exist_ok=True)
    results = run_profiles(ProfileSettings(**options))
    print(write_profile(results, args.out))
    return results


if __name__ == '__main__':
    main()
