"""The eval bias cache over a sequence of input shapes: Agent-PVT-T with its
default cache policy, cached at first sight, without cache (in a lower
precision also with its maps built, none folded into the products), and on
the reference path, in one precision. Prints a markdown table (first
forward's peak memory, the memory held after a COCO-like sequence of
distinct keep-ratio shapes, its time, and a repeated shape's time); how it
is measured:
:mod:`agent_mm.benchmark.shape_sequence`.

Example::

    python tools/analysis_tools/benchmark_shape_sequence.py --first-size 1024
    python tools/analysis_tools/benchmark_shape_sequence.py --dtype bfloat16
"""
import argparse

import torch

from agent_mm.benchmark.cli import add_host_options
from agent_mm.benchmark.models import DTYPES, FLOAT32
from agent_mm.benchmark.shape_sequence import (coco_like_shapes,
                                               measure_variants, report)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument(
        '--first-size',
        type=int,
        default=1024,
        help='side of the square input of the first forward')
    parser.add_argument(
        '--dtype',
        choices=list(DTYPES),
        default=FLOAT32,
        help='precision (default: float32); the others run the forward '
        'under torch.autocast with float32 parameters')
    add_host_options(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = coco_like_shapes()
    results = measure_variants(args.first_size, shapes, args.seed,
                               args.dtype)
    print(report(results, shapes, args.first_size, args.dtype))
    return results


if __name__ == '__main__':
    main()
