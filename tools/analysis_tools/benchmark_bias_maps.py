"""Agent attention's bias maps built for an uncached inference forward by
matrix products, and as the model builds them (a float32 token-major map by
rows: :func:`agent_mm.models.bias_maps.resize_rows_into`).

For each model and input size, every agent attention of an eval forward
builds its two maps into a shared workspace, as an uncached forward does;
the products, the model's build and the uncached forward itself are timed
round-robin (:func:`agent_mm.utils.timing.interleaved_times`). Prints their
median times, the builds' ratio, the time saved as a share of the forward,
and the largest difference between the two builds' maps.

Example::

    python tools/analysis_tools/benchmark_bias_maps.py \
        --models agent_pvt_t agent_swin_t --sizes 1024 800x1216
"""
import argparse
import statistics
from typing import Tuple

import torch

from agent_mm.benchmark.attention_calls import AttentionCalls, attention_calls
from agent_mm.benchmark.cli import add_agent_model_options, add_host_options
from agent_mm.benchmark.models import MODELS, Size, reference_twin, size_text
from agent_mm.models.workspace import reuses_memory
from agent_mm.utils.timing import Step, eval_step, interleaved_times

CPU = torch.device('cpu')


def map_builds(calls: AttentionCalls, frozen: bool) -> Step:
    """All maps of ``calls`` built into one workspace, without autograd:
    as inference builds them (``frozen``), or as a forward with autograd
    would (by matrix products)."""

    @reuses_memory
    def build() -> None:
        for module, hw_shape in calls:
            module.build_biases(hw_shape, frozen=frozen, for_once=True)

    def step() -> None:
        with torch.no_grad():
            build()

    return step


def maps_compared(calls: AttentionCalls) -> Tuple[float, float]:
    """The maps' size in MB, and the largest difference between the two
    builds."""
    size, error = 0, 0.
    with torch.no_grad():
        for module, hw_shape in calls:
            built = module.build_biases(hw_shape, frozen=True)
            products = module.build_biases(hw_shape)
            for ours, theirs in zip(built, products):
                size += ours.numel() * ours.element_size()
                error = max(error, float((ours - theirs).abs().max()))
    return size / 2**20, error


def compare(key: str, size: Size, repeats: int) -> str:
    """One markdown row for model ``key`` at input ``size``."""
    model = MODELS[key].build(bias_cache_size=0).eval()
    inputs = torch.randn(1, 3, *size)
    calls = attention_calls(model, inputs)
    steps = {
        'products': map_builds(calls, frozen=False),
        'model': map_builds(calls, frozen=True),
        'forward': eval_step(model, inputs)
    }
    times = interleaved_times(steps, 1, repeats, CPU)
    products, built, forward = (1000 * statistics.median(times[name])
                                for name in steps)
    megabytes, error = maps_compared(calls)
    return (f'| {MODELS[key].label} | {size_text(size)} | {megabytes:.0f} '
            f'| {products:.1f} | {built:.1f} | {built / products:.3f} '
            f'| {forward:.0f} | {(products - built) / forward:.3f} '
            f'| {error:.1e} |')


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    add_agent_model_options(
        parser, [key for key in MODELS if reference_twin(key)],
        [(1024, 1024), (800, 1216)], 9)
    add_host_options(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(f'float32, {args.threads} threads, torch {torch.__version__}; '
          f'medians of {args.repeats} round-robin calls\n')
    print('| Model | Input | Maps MB | Products ms | Model\'s build ms '
          '| Build / products | Uncached forward ms | Saved / forward '
          '| Max diff |\n|---|---|---:|---:|---:|---:|---:|---:|---:|')
    for key in args.models:
        for size in args.sizes:
            print(compare(key, size, args.repeats), flush=True)


if __name__ == '__main__':
    main()
