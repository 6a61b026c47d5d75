"""Latency, peak memory, bias cache and FLOPs of the benchmarked models.

Models are measured round-robin (one call of each per repeat, in a rotating
order, see :func:`agent_mm.utils.timing.interleaved_times`) so load from
other processes hits all of them. The scaling of a model's forward time
with the input size is timed the same way, its two sizes alternating.

Each row is one precision (a key of
:data:`~agent_mm.benchmark.models.DTYPES`): float32, or the forward under
``torch.autocast`` with float32 parameters (the backward of a training step
runs outside autocast). The precisions of a run are interleaved with the
models, call by call, so that a ratio between precisions is measured side
by side like one between models: each precision after the first runs a
copy of each model (:func:`precision_copies`), whose eval bias cache holds
that precision's maps (one cache switching between precisions would
rebuild its maps at every call).

Peak memory is the largest amount of tensor memory allocated during one call
on top of what was live when the call started (weights, the input and the
eval-mode bias cache are live before, so they are not counted; the cache is
reported in its own column). On CUDA it comes from
``torch.cuda.max_memory_allocated``. On the CPU it is replayed from the
allocation and free events that ``torch.profiler`` (``profile_memory=True``)
records for every allocation of torch's CPU allocator: the events are sorted
by time and the running total's maximum is the peak. Memory that libraries
allocate outside torch's allocator (oneDNN scratchpads, BLAS buffers) is not
seen, and neither is allocator caching, so this is a lower bound on RSS.

Each eval round also times a ``MATMUL_SIZE``³ ``torch.mm`` in every
precision, interleaved with the models' calls: its median rate
(``matmul_gflops``) is the machine's product rate in the same minutes as
the row, against which the row's FLOPs give its GEMM roofline (see
:func:`~agent_mm.benchmark.targets.roofline_share`).

Faults are the memory the kernel maps into the process during a timed call
(minor page faults, :class:`~agent_mm.utils.timing.Call`), the median over
the calls: memory the C allocator returned to the kernel on free and must
fault in again. Their system time is part of the call's wall time, and it
moves with the machine more than the computation does.

FLOPs come from mmengine's ``FlopAnalyzer`` (one multiply-add = one flop)
with handles for ``scaled_dot_product_attention`` and ``baddbmm``. The
analyzer traces the model with ``torch.jit.trace``, and while a graph is
traced agent attention takes its traced path
(:mod:`~agent_mm.models.traced_agent_attention`) in every variant: the
counts are the network's arithmetic, the same for the fast and reference
paths, and they include the bias maps' resizing (about 2 % of
Agent-PVT-T's), which a warm fast forward reads from its cache instead, so
a roofline share computed from them is that much too high.
"""
import copy
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from agent_mm.models import AgentAttention
from agent_mm.utils.flops import flop_analyzer
from agent_mm.utils.timing import (Call, Key, Step, eval_step,
                                   interleaved_calls, interleaved_times,
                                   peak_bytes, train_step)
from .models import (DTYPES, FLOAT32, MODELS, Size, in_precision, size_text,
                     token_count)

MB = 2**20
# FLOPs do not depend on the precision: counted in the first one only
FLOP_FIELDS = ('flops', 'layer_flops', 'unsupported_ops')
# side of the square product whose rate each eval row is given
MATMUL_SIZE = 2048
# the key of that product among the models' steps
MATMUL = 'matmul'
# ops of agent attention's bias resizing and attention products; the other
# ops (projections, MLPs, convolutions, norms) are the network around it
PATH_SPECIFIC_OPS = ('upsample_bilinear2d', 'matmul', 'bmm',
                     'scaled_dot_product_attention')


class Timing(NamedTuple):
    """How calls are timed.

    Attributes:
        warmup: Untimed calls of a model right before each timed one.
        repeats: Timed calls per model.
        device: Where the models run.
    """
    warmup: int
    repeats: int
    device: torch.device

    def calls(self, steps: Dict[Key, Step]) -> Dict[Key, List[Call]]:
        """Each step's timed calls, the steps interleaved."""
        return interleaved_calls(steps, self.warmup, self.repeats,
                                 self.device)

    def times(self, steps: Dict[Key, Step]) -> Dict[Key, List[float]]:
        """Seconds of each step's timed calls, the steps interleaved."""
        return interleaved_times(steps, self.warmup, self.repeats,
                                 self.device)


def log(message: str) -> None:
    """Print progress on stderr (stdout carries the table)."""
    print(
        f'[{time.strftime("%H:%M:%S")}] {message}',
        file=sys.stderr,
        flush=True)


def median_ms(times: Sequence[float]) -> float:
    """The median of times in seconds, in milliseconds."""
    return statistics.median(times) * 1e3


def count_flops(model: nn.Module,
                inputs: Tensor) -> Tuple[int, int, List[str]]:
    """Count the FLOPs of one cold eval forward.

    Args:
        model: The model (left in eval mode, bias caches empty).
        inputs: Its input batch.

    Returns:
        FLOPs (multiply-adds), the part of them outside
        :data:`PATH_SPECIFIC_OPS` (projections, MLPs, convs, norms) and the
        op kinds the analyzer could not count.
    """
    model.eval()  # also empties the agent-attention bias caches
    with torch.no_grad():
        analyzer = flop_analyzer(model, (inputs, ))
        flops = analyzer.total()
        layer_flops = sum(
            count for op, count in analyzer.by_operator().items()
            if op not in PATH_SPECIFIC_OPS)
        unsupported = sorted(analyzer.unsupported_ops())
    model.eval()
    return int(flops), int(layer_flops), unsupported


def flops_wanted(peak_mb: float, max_peak_mb: Optional[float]) -> bool:
    """Whether to count FLOPs of a model whose forward peak is ``peak_mb``.

    Tracing needs more memory than a forward, so FLOPs are skipped above
    ``max_peak_mb`` (None: always counted).
    """
    return max_peak_mb is None or peak_mb <= max_peak_mb


def bias_cache_bytes(model: nn.Module) -> int:
    """Bytes held by the eval-mode bias caches of the agent attentions."""
    return sum(module.bias_cache.nbytes for module in model.modules()
               if isinstance(module, AgentAttention))


def output_differences(models: Dict[str, nn.Module],
                       inputs: Tensor) -> Dict[str, float]:
    """Compare the outputs of the fast and reference paths (eval).

    Args:
        models: Models by key of :data:`~agent_mm.benchmark.models.MODELS`.
        inputs: The input batch.

    Returns:
        Max |fast − reference| over all outputs, by key of the fast model,
        for every reference-path model built with its fast twin.
    """
    diffs = {}
    for key, model in models.items():
        twin = MODELS[key].reference_of
        if twin not in models:
            continue
        with torch.no_grad():
            pairs = zip(models[twin].eval()(inputs), model.eval()(inputs))
            diffs[twin] = max((a - b).abs().max().item() for a, b in pairs)
    return diffs


def fault_mb(calls: Sequence[Call],
             statistic: Callable[[List[int]], float] = statistics.median
             ) -> Optional[float]:
    """A statistic (default: the median) of the memory the calls faulted in,
    in MB; None where faults are not counted."""
    faulted = [call.faulted_bytes for call in calls]
    if None in faulted:
        return None
    return statistic(faulted) / MB


def time_row(key: str, size: Size, batch: int, dtype: str,
             calls: Sequence[Call]) -> dict:
    """The row of model ``key`` at one size and precision: its times in ms
    and the median memory its calls faulted in (``fault_mb``)."""
    times = [call.seconds for call in calls]
    return dict(
        model=key,
        size=list(size),
        dtype=dtype,
        batch=batch,
        tokens=token_count(size),
        times_ms=[t * 1e3 for t in times],
        median_ms=median_ms(times),
        fault_mb=fault_mb(calls))


def eval_extras(model: nn.Module,
                inputs: Tensor,
                peak_mb: float,
                flops_max_peak_mb: Optional[float],
                counted: Optional[dict] = None) -> dict:
    """The eval-only fields of a row: the bias cache and FLOPs.

    Args:
        model: The model, its bias caches as its timed calls left them.
        inputs: Its input batch.
        peak_mb: Its measured forward peak (see :func:`flops_wanted`).
        flops_max_peak_mb: No FLOPs counted above this peak (None: always).
        counted: The row of the same model in another precision, whose
            FLOPs are taken instead of counting them again (they do not
            depend on the precision).

    Returns:
        ``bias_cache_mb``, ``flops``, ``layer_flops`` and
        ``unsupported_ops`` (the last three None when not counted).
    """
    extras = dict(bias_cache_mb=bias_cache_bytes(model) / MB)
    if counted is not None:
        counts = tuple(counted[field] for field in FLOP_FIELDS)
    elif flops_wanted(peak_mb, flops_max_peak_mb):
        counts = count_flops(model, inputs)
    else:
        counts = (None, None, None)
    extras.update(zip(FLOP_FIELDS, counts))
    return extras


def precision_copies(models: Dict[str, nn.Module],
                     dtypes: Sequence[str]) -> Dict[str, Dict[str, nn.Module]]:
    """The models each of ``dtypes`` runs: the first precision the models
    themselves, every other a deep copy of each (same weights, its own
    bias cache)."""
    return {
        dtype: models if index == 0 else
        {key: copy.deepcopy(model)
         for key, model in models.items()}
        for index, dtype in enumerate(dtypes)
    }


def matmul_step(dtype: torch.dtype, size: int, device: torch.device) -> Step:
    """A ``size``³ ``torch.mm`` in ``dtype``, its operands made once."""
    a, b = (torch.randn(size, size, device=device).to(dtype)
            for _ in range(2))
    return lambda: torch.mm(a, b)


def matmul_flops(size: int) -> int:
    """The FLOPs of a ``size``³ product (2 per multiply-add)."""
    return 2 * size**3


def matmul_gflops(calls: Sequence[Call], size: int) -> float:
    """The rate of the median of ``calls`` of a ``size``³ product, in
    GFLOP/s."""
    return matmul_flops(size) / median_ms([call.seconds
                                           for call in calls]) / 1e6


def measure(models: Dict[str, nn.Module],
            size: Size,
            batch: int,
            train: bool,
            timing: Timing,
            flops_max_peak_mb: Optional[float] = None,
            dtypes: Sequence[str] = (FLOAT32, ),
            matmul_size: int = MATMUL_SIZE) -> List[dict]:
    """Measure every model at one size, in each precision.

    First the interleaved latency of all models in all precisions (in eval,
    with a ``matmul_size``³ product in each precision among them), then
    the peak memory of each (and in eval its bias cache and FLOPs, counted
    in the first precision and shared by the others).

    Args:
        models: Models by key.
        size: Input size ``(H, W)``.
        batch: Batch size.
        train: Time forward + backward in train mode instead of an eval
            forward without autograd.
        timing: How calls are timed.
        flops_max_peak_mb: See :func:`eval_extras`.
        dtypes: The precisions, keys of
            :data:`~agent_mm.benchmark.models.DTYPES`.
        matmul_size: Side of the product timed beside the eval calls.

    Returns:
        One row per precision and model (precision-major): ``model``,
        ``size``, ``dtype``, ``batch``, ``tokens``, ``times_ms``,
        ``median_ms``, ``fault_mb``, ``peak_mb`` and, in eval, the fields of
        :func:`eval_extras` and ``matmul_gflops`` (:func:`matmul_gflops` of
        the product timed in the same rounds, in the row's precision).
    """
    inputs = torch.randn(batch, 3, *size, device=timing.device)
    make_step = train_step if train else eval_step
    for model in models.values():
        model.train(train)
    runs = precision_copies(models, dtypes)
    steps = {(dtype, key): make_step(in_precision(model, dtype,
                                                  timing.device), inputs)
             for dtype, copies in runs.items()
             for key, model in copies.items()}
    products = {} if train else {
        (dtype, MATMUL): matmul_step(DTYPES[dtype], matmul_size,
                                     timing.device)
        for dtype in dtypes
    }
    load_before = os.getloadavg()[0]
    calls = timing.calls({**steps, **products})
    rows: Dict[Tuple[str, str], dict] = {}
    for (dtype, key), step in steps.items():
        model = runs[dtype][key]
        row = time_row(key, size, batch, dtype, calls[dtype, key])
        model.zero_grad(set_to_none=True)  # frees nothing while profiled
        row['peak_mb'] = peak_bytes(step, timing.device) / MB
        if not train:
            # rows are precision-major: the first precision's is there
            # before the others'
            row.update(
                eval_extras(model, inputs, row['peak_mb'], flops_max_peak_mb,
                            rows.get((dtypes[0], key))),
                matmul_gflops=matmul_gflops(calls[dtype, MATMUL],
                                            matmul_size))
        model.zero_grad(set_to_none=True)
        model.eval()  # drop this size's bias cache before the next size
        rows[dtype, key] = row
    mode = 'train' if train else 'eval'
    log(f'{mode} {size[0]}x{size[1]} {"+".join(dtypes)} done (load avg '
        f'{load_before:.1f} → {os.getloadavg()[0]:.1f})')
    return list(rows.values())


def measure_scaling(key: str,
                    model: nn.Module,
                    sizes: Sequence[Size],
                    batch: int,
                    timing: Timing,
                    dtype: str = FLOAT32) -> dict:
    """Time the eval forward of one model at two sizes, alternating.

    The sizes alternate call by call so that a drift of the machine's speed
    hits both alike (the tables time sizes minutes apart).

    Args:
        key: The model's key.
        model: The model.
        sizes: The two input sizes.
        batch: Batch size.
        timing: How calls are timed.
        dtype: The precision, a key of
            :data:`~agent_mm.benchmark.models.DTYPES`.

    Returns:
        ``model``, ``sizes``, ``dtype``, ``times_ms`` and ``median_ms`` of
        each size, and ``ratio``: the second size's median over the
        first's.
    """
    model.eval()
    runner = in_precision(model, dtype, timing.device)
    steps = {
        size_text(size): eval_step(
            runner, torch.randn(batch, 3, *size, device=timing.device))
        for size in sizes
    }
    times = timing.times(steps)
    model.eval()  # drop the bias caches of both sizes
    medians = [median_ms(times[step]) for step in steps]
    log(f'scaling {" / ".join(steps)} done')
    return dict(
        model=key,
        sizes=[list(size) for size in sizes],
        dtype=dtype,
        times_ms={step: [t * 1e3 for t in times[step]]
                  for step in steps},
        median_ms=medians,
        ratio=medians[1] / medians[0])
