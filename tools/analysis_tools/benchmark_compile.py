"""Eager against ``torch.compile`` (inductor) for a backbone's eval forward,
in float32 and under bfloat16 autocast; the two are called alternately and
the median times, their ratio and the largest output difference printed.

Example::

    python tools/analysis_tools/benchmark_compile.py --model agent_pvt_t \
        --size 1024 --repeats 5
"""
import argparse
import statistics
import time
from typing import Dict, List

import torch
import torch._dynamo
import torch.nn as nn

from agent_mm.benchmark.cli import add_host_options
from agent_mm.benchmark.models import MODELS

# one compiled graph per stage and block shape: more than dynamo's default 8
CACHE_SIZE_LIMIT = 64


def forward(model: nn.Module, x: torch.Tensor, dtype: str) -> tuple:
    """An eval forward, under bfloat16 autocast if ``dtype`` says so."""
    with torch.no_grad(), torch.autocast(
            'cpu', dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
        return model(x)


def alternate(models: Dict[str, nn.Module], x: torch.Tensor, dtype: str,
              repeats: int) -> Dict[str, List[float]]:
    """Seconds of ``repeats`` calls of each model, the order flipping
    every round."""
    times = {name: [] for name in models}
    order = list(models)
    for _ in range(repeats):
        for name in order:
            start = time.perf_counter()
            forward(models[name], x, dtype)
            times[name].append(time.perf_counter() - start)
        order.reverse()
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='agent_pvt_t', choices=MODELS)
    parser.add_argument('--size', type=int, default=1024)
    parser.add_argument('--repeats', type=int, default=5)
    add_host_options(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch._dynamo.config.cache_size_limit = CACHE_SIZE_LIMIT
    eager = MODELS[args.model].build().eval()
    models = {'eager': eager, 'compiled': torch.compile(eager)}
    x = torch.randn(1, 3, args.size, args.size)
    for dtype in ('float32', 'bfloat16'):
        start = time.perf_counter()
        for _ in range(2):  # compiles, then runs the compiled graphs
            forward(models['compiled'], x, dtype)
        warm = time.perf_counter() - start
        forward(eager, x, dtype)
        times = alternate(models, x, dtype, args.repeats)
        eager_ms, compiled_ms = (1000 * statistics.median(times[name])
                                 for name in ('eager', 'compiled'))
        error = max(
            float((a.float() - b.float()).abs().max())
            for a, b in zip(
                forward(eager, x, dtype), forward(models['compiled'], x,
                                                  dtype)))
        print(f'{args.model} {args.size}² {dtype}: compile + 2 calls '
              f'{warm:.1f} s; eager {eager_ms:.0f} ms, compiled '
              f'{compiled_ms:.0f} ms, compiled / eager '
              f'{compiled_ms / eager_ms:.2f}, max |diff| {error:.1e}')


if __name__ == '__main__':
    main()
