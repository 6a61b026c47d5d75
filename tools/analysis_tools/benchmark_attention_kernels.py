"""Agent attention's two attentions at a backbone's own shapes, by PyTorch's
fused kernel (what the fast path calls), by explicit products, and by the
fused kernel over chunks of the keys, timed round-robin; prints a markdown
table with each kernel's time, rate, ratio to the fused kernel and largest
difference from it, and the rate of a ``--matmul-size``³ matmul (2048³
by default) measured in the same run
(:mod:`agent_mm.benchmark.attention_kernels`).

Example::

    python tools/analysis_tools/benchmark_attention_kernels.py \
        --model agent_pvt_t --size 1024 --dtype float32 bfloat16
"""
import argparse

import torch

from agent_mm.benchmark.attention_kernels import (TABLE_HEADER,
                                                  compare_kernels,
                                                  markdown_rows,
                                                  model_problems,
                                                  problem_as_run)
from agent_mm.benchmark.cli import (add_dtype_option, add_host_options,
                                    add_matmul_size_option, check_dtype_option,
                                    parse_size)
from agent_mm.benchmark.models import MODELS
from agent_mm.benchmark.profile import CPU, matmul_rate


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument(
        '--model',
        default='agent_pvt_t',
        choices=[key for key in MODELS if key.startswith('agent_')])
    parser.add_argument('--size', type=parse_size, default=(1024, 1024))
    parser.add_argument('--repeats', type=int, default=5)
    add_dtype_option(parser)
    add_host_options(parser)
    add_matmul_size_option(parser)
    args = parser.parse_args(argv)
    check_dtype_option(parser, args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = MODELS[args.model].build().eval()
    problems = model_problems(model, torch.randn(1, 3, *args.size))
    lines = list(TABLE_HEADER)
    rates = []
    for name in args.dtypes:
        dtype = getattr(torch, name)
        for problem in (problem_as_run(p, dtype, CPU) for p in problems):
            lines += markdown_rows(
                problem, name,
                compare_kernels(problem, dtype, args.repeats, CPU))
        rate = matmul_rate(dtype, args.matmul_size, CPU)
        rates.append(f'{name} {rate / 1e9:.0f}')
    print(f'{args.model} at {args.size[0]}×{args.size[1]}, '
          f'{torch.get_num_threads()} threads, torch {torch.__version__}; '
          f'matmul {args.matmul_size}³ GFLOP/s in the same run: '
          + ', '.join(rates) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
