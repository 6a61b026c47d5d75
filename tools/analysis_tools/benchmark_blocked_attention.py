"""Agent attention by blocks of explicit products against PyTorch's fused
kernel only, for backbones' eval forwards: the two are timed round-robin
(:func:`agent_mm.utils.timing.interleaved_times`), and the median times,
their ratio and the largest output difference are printed.

The blocked column holds every attention to the blocks
(:func:`agent_mm.ops.blocked_attention.blocks_only`), in any precision and
on any CPU, also where the model would not choose them by itself (it
chooses them in bfloat16 on a CPU with AVX512-BF16 and no AMX): on a CPU
with AMX, or in float32, the table says whether they would pay there.

Example::

    python tools/analysis_tools/benchmark_blocked_attention.py \
        --models agent_pvt_t agent_swin_t --sizes 1024 800x1344
"""
import argparse
import statistics
from typing import Callable

import torch

from agent_mm.benchmark.cli import add_agent_model_options, add_host_options
from agent_mm.benchmark.models import (DTYPES, MODELS, Size, in_precision,
                                       size_text)
from agent_mm.ops.blocked_attention import (blocks_only,
                                            cpu_lacks_amx_for_bfloat16,
                                            fused_kernel_only)
from agent_mm.utils.timing import Step, eval_step, interleaved_times

CPU = torch.device('cpu')


def held_to(kernel_only: Callable, step: Step) -> Step:
    """``step`` run within the context ``kernel_only()``."""

    def run() -> None:
        with kernel_only():
            step()

    return run


def outputs_of(model: Callable, x: torch.Tensor) -> list:
    """``model(x)``'s outputs in float32, without autograd."""
    with torch.no_grad():
        return [out.float() for out in model(x)]


def compare(key: str, size: Size, dtype: str, repeats: int) -> str:
    """One line: both kernels' median forward times, their ratio and the
    largest difference of their outputs."""
    model = in_precision(MODELS[key].build().eval(), dtype, CPU)
    x = torch.randn(1, 3, *size)
    forward = eval_step(model, x)
    steps = {
        'fused': held_to(fused_kernel_only, forward),
        'blocked': held_to(blocks_only, forward)
    }
    times = interleaved_times(steps, 1, repeats, CPU)
    fused_ms, blocked_ms = (1000 * statistics.median(times[name])
                            for name in ('fused', 'blocked'))
    with fused_kernel_only():
        expected = outputs_of(model, x)
    with blocks_only():
        blocked = outputs_of(model, x)
    error = max(
        float((a - b).abs().max()) for a, b in zip(blocked, expected))
    return (f'| {MODELS[key].label} | {size_text(size)} | {dtype} '
            f'| {fused_ms:.0f} | {blocked_ms:.0f} '
            f'| {blocked_ms / fused_ms:.3f} | {error:.1e} |')


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    add_agent_model_options(
        parser, [key for key in MODELS if key.startswith('agent_')],
        [(1024, 1024), (800, 1344)], 5)
    parser.add_argument('--dtype', default='bfloat16', choices=list(DTYPES))
    add_host_options(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(f'{args.threads} threads, torch {torch.__version__}; this CPU has '
          f'AVX512-BF16 without AMX (models choose the blocks in bfloat16): '
          f'{cpu_lacks_amx_for_bfloat16()}\n')
    print('| Model | Input | Dtype | Fused ms | Blocked ms | Blocked / fused '
          '| Max diff |\n|---|---|---|---:|---:|---:|---:|')
    for key in args.models:
        for size in args.sizes:
            print(compare(key, size, args.dtype, args.repeats), flush=True)


if __name__ == '__main__':
    main()
