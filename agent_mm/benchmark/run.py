"""A whole benchmark run, from its settings to its results dict.

The results hold ``meta`` (how the run measured), ``params``, the ``eval``
and ``train`` rows of :func:`~agent_mm.benchmark.measure.measure` (one per
model, size and precision), ``skipped`` models, ``output_max_abs_diff``
(float32), ``scaling`` (when timed), the target ``ratios`` (their model
comparisons from the rows of the run's first precision, the bfloat16 /
float32 targets from both), the ``flop_checks`` (first precision) and the
``precision_ratios`` (lower precision / float32 time, when both ran).
"""
import math
import os
import platform
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn

from .measure import (MATMUL_SIZE, Timing, log, measure, measure_scaling,
                      output_differences)
from .models import (Size, build_models, check_dtypes, parameter_counts,
                     within_limits)
from .targets import (SCALING_MODEL, flop_checks, precision_ratios, rows_in,
                      target_ratios)

Results = dict
# called with the results after each measured size, e.g. to save them
OnUpdate = Callable[[Results], None]


@dataclass(frozen=True)
class Settings:
    """What a run measures and how (the options of the command line).

    Attributes:
        models: Keys of :data:`~agent_mm.benchmark.models.MODELS` to run.
        sizes: Eval input sizes.
        train_sizes: Forward + backward input sizes (may be empty).
        batch: Eval batch.
        train_batch: Forward + backward batch.
        repeats: Timed calls per model.
        warmup: Untimed calls of a model right before each timed one.
        device: ``'cpu'`` or ``'cuda[:i]'``.
        dtypes: Precisions (keys of
            :data:`~agent_mm.benchmark.models.DTYPES`), measured one after
            the other at each size; the targets, FLOP checks and scaling
            pair use the first.
        threads: ``torch.set_num_threads``.
        flops_max_peak_mb: No FLOP counting of a model whose forward peak
            exceeds this (None: count all).
        max_tokens: The largest number of tokens a model may run at, by
            key (models not named are not limited).
        scaling_sizes: The two sizes at which
            :data:`~agent_mm.benchmark.targets.SCALING_MODEL` is timed
            alternately, or none.
        seed: ``torch.manual_seed`` before the models are built.
        matmul_size: Side of the product timed beside the eval calls for
            the GEMM roofline.
    """
    models: Sequence[str]
    sizes: Sequence[Size]
    train_sizes: Sequence[Size]
    batch: int
    train_batch: int
    repeats: int
    warmup: int
    device: str
    dtypes: Sequence[str]
    threads: int
    flops_max_peak_mb: Optional[float]
    max_tokens: Dict[str, int]
    scaling_sizes: Sequence[Size]
    seed: int
    matmul_size: int = MATMUL_SIZE

    def timing(self) -> Timing:
        """How calls are timed."""
        return Timing(self.warmup, self.repeats, torch.device(self.device))


def memory_method(device: torch.device) -> str:
    """How peak memory is measured on ``device``, for the report."""
    if device.type == 'cuda':
        return ('torch.cuda.max_memory_allocated above the allocation '
                'before the call')
    return ('replay of torch.profiler CPU allocation/free events; tensor '
            'memory allocated during the call above what was live before '
            'it (weights, input and bias cache excluded)')


def new_results(settings: Settings) -> Results:
    """Results with the run's ``meta`` and nothing measured yet."""
    return dict(
        meta=dict(
            device=str(torch.device(settings.device)),
            dtypes=list(settings.dtypes),
            threads=torch.get_num_threads(),
            torch=torch.__version__,
            python=platform.python_version(),
            cpu_count=os.cpu_count(),
            batch=settings.batch,
            train_batch=settings.train_batch,
            repeats=settings.repeats,
            warmup=settings.warmup,
            matmul_size=settings.matmul_size,
            # interleaved_calls' first round (see there)
            untimed_round=settings.warmup > 0,
            memory_method=memory_method(torch.device(settings.device)),
            load_avg_start=os.getloadavg()[0]),
        params={},
        eval=[],
        train=[],
        skipped=[],
        output_max_abs_diff={})


def measure_sizes(models: Dict[str, nn.Module], settings: Settings,
                  results: Results, on_update: OnUpdate) -> None:
    """Measure every size of both modes, in every precision, into
    ``results``.

    Models whose ``max_tokens`` a size exceeds are listed in ``skipped``.
    """
    for mode, sizes in (('eval', settings.sizes),
                        ('train', settings.train_sizes)):
        for size in sizes:
            active = within_limits(models, size, settings.max_tokens)
            results['skipped'] += [
                dict(model=key, size=list(size), mode=mode) for key in models
                if key not in active
            ]
            batch = settings.train_batch if mode == 'train' else settings.batch
            results[mode] += measure(active, size, batch, mode == 'train',
                                     settings.timing(),
                                     settings.flops_max_peak_mb,
                                     settings.dtypes, settings.matmul_size)
            on_update(results)


def scaling_wanted(models: Dict[str, nn.Module], settings: Settings) -> bool:
    """Whether the scaling pair is timed: two sizes given and
    :data:`~agent_mm.benchmark.targets.SCALING_MODEL` built and allowed at
    the larger."""
    largest = max(settings.scaling_sizes, key=math.prod, default=None)
    return bool(largest) and SCALING_MODEL in within_limits(
        models, largest, settings.max_tokens)


def judge(results: Results, dtype: str) -> None:
    """Add the target ``ratios`` (the model comparisons from the rows of
    precision ``dtype``), the ``flop_checks`` (from those rows) and the
    ``precision_ratios`` to ``results``."""
    results['ratios'] = target_ratios(results['eval'], results['train'],
                                      results.get('scaling'), dtype)
    results['flop_checks'] = flop_checks(rows_in(results['eval'], dtype))
    results['precision_ratios'] = (
        precision_ratios(results['eval'], 'eval') +
        precision_ratios(results['train'], 'train'))


def run(settings: Settings,
        on_update: OnUpdate = lambda results: None) -> Results:
    """Build the models, measure them and judge the run.

    Sets torch's threads and seed first.

    Args:
        settings: What to measure and how.
        on_update: Called with the results after each measured size and
            after the scaling pair.

    Returns:
        The results (see the module docstring).

    Raises:
        ValueError: If ``settings.dtypes`` are not distinct known
            precisions.
    """
    check_dtypes(settings.dtypes)
    device = torch.device(settings.device)
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    results = new_results(settings)
    log(f'building {len(settings.models)} models on {device}, '
        f'{settings.threads} threads')
    models = build_models(settings.models, device)
    results['params'] = parameter_counts(models)
    smallest = min(settings.sizes, key=math.prod)
    results['output_max_abs_diff'] = output_differences(
        models, torch.randn(1, 3, *smallest, device=device))
    measure_sizes(models, settings, results, on_update)
    if scaling_wanted(models, settings):
        results['scaling'] = measure_scaling(SCALING_MODEL,
                                             models[SCALING_MODEL],
                                             settings.scaling_sizes,
                                             settings.batch,
                                             settings.timing(),
                                             settings.dtypes[0])
        on_update(results)
    results['meta']['load_avg_end'] = os.getloadavg()[0]
    judge(results, settings.dtypes[0])
    return results
