"""Eager against ``torch.compile`` (inductor) for a backbone's eval forward,
in float32 and under bfloat16 autocast; the two are timed round-robin
(:func:`agent_mm.utils.timing.interleaved_times`), and the median times,
their ratio and the largest output difference are printed.

Example::

    python tools/analysis_tools/benchmark_compile.py --model agent_pvt_t \
        --size 1024 --repeats 5
"""
import argparse
import statistics
import time

import torch
import torch._dynamo

from agent_mm.benchmark.cli import add_host_options
from agent_mm.benchmark.models import MODELS, in_precision
from agent_mm.utils.timing import eval_step, interleaved_times

# one compiled graph per stage and block shape: more than dynamo's default 8
CACHE_SIZE_LIMIT = 64
CPU = torch.device('cpu')


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
    compiled = torch.compile(eager)
    x = torch.randn(1, 3, args.size, args.size)
    for dtype in ('float32', 'bfloat16'):
        models = {
            'eager': in_precision(eager, dtype, CPU),
            'compiled': in_precision(compiled, dtype, CPU)
        }
        steps = {name: eval_step(m, x) for name, m in models.items()}
        start = time.perf_counter()
        for _ in range(2):  # compiles, then runs the compiled graphs
            steps['compiled']()
        warm = time.perf_counter() - start
        times = interleaved_times(steps, 1, args.repeats, CPU)
        eager_ms, compiled_ms = (1000 * statistics.median(times[name])
                                 for name in ('eager', 'compiled'))
        with torch.no_grad():
            outputs = [models[name](x) for name in ('eager', 'compiled')]
        error = max(
            float((a.float() - b.float()).abs().max())
            for a, b in zip(*outputs))
        print(f'{args.model} {args.size}² {dtype}: compile + 2 calls '
              f'{warm:.1f} s; eager {eager_ms:.0f} ms, compiled '
              f'{compiled_ms:.0f} ms, compiled / eager '
              f'{compiled_ms / eager_ms:.2f}, max |diff| {error:.1e}')


if __name__ == '__main__':
    main()
