"""Eval forward (or, with ``--train``, training step) times with glibc's
allocator as it comes against freed memory kept in the process
(:func:`agent_mm.utils.keep_freed_memory`, what ``tools/train.py``,
``tools/test.py`` and ``tools/infer.py`` do).

The setting holds for a whole process, so each measurement is a child
process of its own; the two settings alternate, model by model, pair after
pair. Each child prints the median time and minor page faults of its
calls; the report gives, per model, the medians over the pairs and the
ratio kept / as it comes. A training step is a forward and the backward of
the sum of the outputs (:func:`agent_mm.utils.timing.train_step`).

Example::

    python tools/analysis_tools/benchmark_freed_memory.py \
        --models agent_pvt_t agent_pvt_t_ref --size 1024 --pairs 3
    python tools/analysis_tools/benchmark_freed_memory.py \
        --models agent_swin_t swin_t --size 800x1344 --dtype bfloat16
    python tools/analysis_tools/benchmark_freed_memory.py \
        --models agent_pvt_t --size 128 --batch 8 --dtype bfloat16 --train
"""
import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
from typing import Dict, List

import torch

from agent_mm.benchmark.cli import add_host_options, parse_size
from agent_mm.benchmark.models import (DTYPES, FLOAT32, MODELS, in_precision,
                                       size_text)
from agent_mm.utils import keep_freed_memory
from agent_mm.utils.allocator import TUNABLES_ENV
from agent_mm.utils.timing import eval_step, measured_call, train_step

AS_IT_COMES, KEPT = 'as it comes', 'kept'
CPU = torch.device('cpu')


def measure_in_this_process(args: argparse.Namespace) -> Dict[str, float]:
    """Median milliseconds and minor faults of ``args.child``'s calls."""
    if args.child == KEPT and not keep_freed_memory():
        raise SystemExit('freed memory cannot be kept here: the C library '
                         'is not glibc, or GLIBC_TUNABLES tunes malloc')
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = MODELS[args.model].build()
    model.train(args.train)  # mmdet's Swin returns None from train()
    model = in_precision(model, args.dtype, CPU)
    make_step = train_step if args.train else eval_step
    step = make_step(model, torch.randn(args.batch, 3, *args.size))
    for _ in range(args.warmup):
        step()
    calls = [measured_call(step, CPU) for _ in range(args.repeats)]
    return dict(ms=1000 * statistics.median(c.seconds for c in calls),
                faults=statistics.median(c.faulted_bytes // mmap.PAGESIZE
                                         for c in calls))


def child_command(args: argparse.Namespace, model: str,
                  setting: str) -> List[str]:
    return [
        sys.executable, __file__, '--child', setting, '--models', model,
        '--size', 'x'.join(map(str, args.size)), '--batch', str(args.batch),
        '--dtype', args.dtype,
        '--warmup', str(args.warmup), '--repeats', str(args.repeats),
        '--threads', str(args.threads), '--seed', str(args.seed)
    ] + ['--train'] * args.train


def run_child(args: argparse.Namespace, model: str,
              setting: str) -> Dict[str, float]:
    # glibc's own tunables would override (or be overridden by) the setting
    env = {k: v for k, v in os.environ.items() if k != TUNABLES_ENV}
    result = subprocess.run(child_command(args, model, setting),
                            capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f'{model} ({setting}) failed:\n'
                           f'{result.stderr[-2000:]}')
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(args: argparse.Namespace,
           runs: Dict[str, Dict[str, List[Dict[str, float]]]]) -> str:
    call = 'training step' if args.train else 'forward'
    lines = [
        f'{size_text(args.size)}, {args.dtype}, {args.threads} threads, '
        f'batch {args.batch}; per process {args.warmup} untimed and '
        f'{args.repeats} timed {call}s (median); medians over {args.pairs} '
        'pair(s) of processes, the settings alternating', '',
        '| Model | ms, as it comes | ms, kept | kept / as it comes '
        f'| faults a {call}, as it comes | faults, kept |',
        '|---|---:|---:|---:|---:|---:|'
    ]
    for model, by_setting in runs.items():
        ms, faults = ({
            setting: statistics.median(run[key] for run in by_setting[setting])
            for setting in (AS_IT_COMES, KEPT)
        } for key in ('ms', 'faults'))
        lines.append(f'| {model} | {ms[AS_IT_COMES]:.0f} | {ms[KEPT]:.0f} | '
                     f'{ms[KEPT] / ms[AS_IT_COMES]:.2f} | '
                     f'{faults[AS_IT_COMES]:.0f} | {faults[KEPT]:.0f} |')
    return '\n'.join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', default=['agent_pvt_t'],
                        choices=MODELS)
    parser.add_argument('--size', type=parse_size, default=(1024, 1024),
                        help='input size, N or HxW (default: 1024)')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument(
        '--train',
        action='store_true',
        help='time training steps (forward and backward) instead of eval '
        'forwards')
    parser.add_argument('--dtype', default=FLOAT32, choices=list(DTYPES))
    parser.add_argument('--pairs', type=int, default=3,
                        help='processes per model and setting')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--child', choices=[AS_IT_COMES, KEPT],
                        help=argparse.SUPPRESS)
    add_host_options(parser)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        args.model, = args.models
        print(json.dumps(measure_in_this_process(args)))
        return
    runs = {model: {AS_IT_COMES: [], KEPT: []} for model in args.models}
    for _ in range(args.pairs):
        for model in args.models:
            for setting in (AS_IT_COMES, KEPT):
                runs[model][setting].append(run_child(args, model, setting))
    print(report(args, runs))


if __name__ == '__main__':
    main()
