"""Where an eval forward's time goes, by op family, against each family's
floor.

``torch.profiler`` (CPU activities, ``record_shapes`` and ``with_flops``)
records warm eval forwards (``no_grad``, after untimed calls, so the bias
cache is filled) of the benchmark's models. The self CPU time of every
``aten::`` op is added to the op's family (:data:`FAMILY_PATTERNS`, e.g.
GEMM, normalisation, layout/copy), and so is that of the few ops of other
namespaces that the models call (:data:`OTHER_NAMESPACE_FAMILIES`); other
ops are left out.

A family's *floor* is the time it could not beat on this machine, a
roofline bound measured in the same process: the largest of

- its FLOPs over the matmul rate, timed on a ``matmul_size``³ ``torch.mm``
  in the run's precision. FLOPs are the profiler's counts (``mm``,
  ``addmm``, ``bmm``, ``baddbmm``, ``conv2d``, ``add``, ``mul``; one
  multiply-add = 2 flops) plus those of the fused attention kernels and
  oneDNN's linear layers, which the profiler does not count, from their
  input shapes;
- its bytes over the memory bandwidth, timed on a ``copy_mb`` MB
  ``dst.copy_(src)`` counting the bytes read and written;
- for the ops of :data:`RATED_OPS`, compute-bound element-wise ops such
  as the exact (erf) GELU, their input elements over the op's own rate,
  the best of a few input sizes in the run's precision (the elements of
  the family's rated ops at their rates, added up).

Bytes are estimated from the recorded input shapes and dtypes: an op moves
its tensor inputs, plus, for the families whose output is the size of an
input (:data:`SAME_SIZE_OUTPUT`) and out-of-place ops (name not ending in
``_``), an output the size of its largest input. This is an approximation:
other families' outputs are not counted, tensor lists (``cat``, ``stack``)
are not recorded by the profiler, expanded views count at their full
shape. An op is counted only where none of its descendants belongs to its
family (``layer_norm`` is counted as its ``native_layer_norm``, ``clone``
as its ``copy_``), and the ops of the :data:`VIEW` family (views,
allocation, metadata queries, and the wrappers ``contiguous`` / ``to`` /
``reshape`` / ``dropout``, whose copies are their ``clone`` / ``_to_copy``
children) move nothing.

The forward's *GEMM roofline* is the time of its products' FLOPs (the
:data:`PRODUCTS` families: matrix products, fused attention kernels and
convolutions) at the matmul rate; the report gives it as a share of the
unprofiled forward. With ``alone`` set, every op of one more
forward is also timed in the forward and re-run alone
(:mod:`agent_mm.benchmark.ops_alone`), by family: whether the forward runs
its kernels at their own speed.

How to read a floor: the bandwidth is that of a copy larger than the caches,
so ops whose data stay in cache can beat it (a memory-bound family below 1×
its floor); the matmul rate is that of a large square product, which small
or skinny products do not reach. The profiler adds a few microseconds to
every op, so families of many small ops look costlier than they are; each
table gives the wall time of an unprofiled forward beside the profiled one.
"""
import inspect
import json
import math
import os.path as osp
import re
import time
from dataclasses import dataclass, field
from typing import (Callable, Dict, Iterator, List, Mapping, NamedTuple,
                    Optional, Sequence)

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

from agent_mm.utils.timing import best_time, timed
from .measure import MATMUL_SIZE, MB, log, matmul_flops, matmul_step
from .models import (DTYPES, MODELS, Size, build_models, check_dtypes,
                     in_precision, size_text)
from .ops_alone import OpTime, op_times

CPU = torch.device('cpu')
GEMM, LAYOUT, VIEW, OTHER = 'GEMM', 'layout/copy', 'view/alloc', 'other'
ATTENTION, CONVOLUTION = 'fused attention', 'convolution'
# the families whose FLOPs make the GEMM roofline
PRODUCTS = (GEMM, ATTENTION, CONVOLUTION)
# aten op name (without ``aten::``) matched in full → family; the first
# pattern that matches wins, ops matching none are OTHER
FAMILY_PATTERNS: Dict[str, str] = {
    r'(mm|bmm|_?addmm\w*|addbmm|baddbmm|matmul|linear|mkldnn_linear|einsum)_?':
    GEMM,
    r'_?scaled_dot_product\w*|_flash_attention\w*|_efficient_attention\w*':
    ATTENTION,
    r'\w*conv\w*': CONVOLUTION,  # conv2d ... mkldnn_convolution
    r'_?(safe_)?(log_)?softmax': 'softmax',
    r'\w*(layer|batch|group|instance|rms)_norm\w*': 'normalisation',
    r'(gelu|relu|relu6|leaky_relu|elu|selu|silu|mish|sigmoid|tanh|hardswish'
    r'|hardsigmoid|hardtanh|softplus|glu)_?': 'activation',
    r'(contiguous|to|reshape|_reshape_alias|view\w*|_unsafe_view|as_strided_?'
    r'|t|transpose|permute|expand\w*|squeeze|unsqueeze|flatten|unflatten'
    r'|slice|select|narrow|split\w*|chunk|unbind|unfold|alias|detach'
    r'|movedim|empty\w*|resize_|resolve_conj|resolve_neg|lift_fresh'
    r'|dropout|result_type|_nnpack_available|item|_local_scalar_dense)':
    VIEW,
    r'copy_|_copy_from\w*|clone|_to_copy|cat|stack|index|_?index_put_?'
    r'|index_select|gather|scatter\w*|_?pad\w*|\w*_pad\w*'
    r'|roll|flip|repeat|tile|im2col|col2im|masked_select|tril|triu':
    LAYOUT,
    r'_?upsample_\w*|grid_sampler\w*|interpolate': 'interpolation',
    r'\w*pool\w*|mean|sum|prod|amax|amin|max|min|argmax|argmin|std|var'
    r'|norm|linalg_vector_norm|all|any|logsumexp|cumsum':
    'reduction/pooling',
    r'(add|sub|rsub|mul|div|neg|exp|log|sqrt|rsqrt|pow|abs|clamp\w*|where'
    r'|masked_fill|fill|zero|zeros\w*|ones\w*|full\w*|lerp|addcmul|addcdiv'
    r'|reciprocal|floor\w*|ceil|round|remainder|fmod|sign|maximum|minimum'
    r'|eq|ne|lt|le|gt|ge|logical_\w+|bitwise_\w+|isneginf|isnan|isinf|sin'
    r'|cos|erf\w*|arange|scalar_tensor|normal|uniform|bernoulli'
    r'|native_dropout)_?': 'elementwise',
}
# ops of other namespaces that the models call → family (oneDNN's linear
# with its epilogue: agent_mm.models.fused_linear)
LINEAR_POINTWISE = 'mkldnn::_linear_pointwise'
OTHER_NAMESPACE_FAMILIES: Dict[str, str] = {LINEAR_POINTWISE: GEMM}
FAMILIES = tuple(dict.fromkeys(FAMILY_PATTERNS.values())) + (OTHER, )
# families whose ops write an output the size of their largest input
SAME_SIZE_OUTPUT = frozenset(('softmax', 'normalisation', 'activation',
                              'elementwise', LAYOUT))
# fused attention kernels (the profiler counts no FLOPs for them)
FUSED_ATTENTION = re.compile(
    r'aten::_scaled_dot_product_(flash|efficient|cudnn|fused)\w*')
# bytes per element of the dtype names the profiler records
ELEMENT_BYTES = {
    'double': 8,
    'float': 4,
    'c10::BFloat16': 2,
    'c10::Half': 2,
    'long int': 8,
    'int': 4,
    'short int': 2,
    'signed char': 1,
    'unsigned char': 1,
    'bool': 1,
}
# compute-bound element-wise ops (profiler name → the op on one tensor):
# their floor is their elements at the op's own rate, which the bandwidth
# bound understates (exact GELU runs at a few G elements/s on 2 cores)
RATED_OPS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    'aten::gelu': F.gelu,
    'aten::gelu_': torch.ops.aten.gelu_,  # the models' MLPs (in place)
}
_COMPILED = [(re.compile(pattern), family)
             for pattern, family in FAMILY_PATTERNS.items()]


def op_family(name: str) -> str:
    """The family of profiler event ``name``, e.g. ``'aten::mm'`` → GEMM;
    OTHER for unknown ``aten`` ops and ops of other namespaces not in
    :data:`OTHER_NAMESPACE_FAMILIES`."""
    if name in OTHER_NAMESPACE_FAMILIES:
        return OTHER_NAMESPACE_FAMILIES[name]
    namespace, _, op = name.partition('::')
    if namespace != 'aten':
        return OTHER
    return next((family for pattern, family in _COMPILED
                 if pattern.fullmatch(op)), OTHER)


def is_counted(event: FunctionEvent) -> bool:
    """Whether ``event`` is an op the families add up: an ``aten::`` op or
    one of :data:`OTHER_NAMESPACE_FAMILIES`."""
    return (event.name.startswith('aten::')
            or event.name in OTHER_NAMESPACE_FAMILIES)


def descendants(event: FunctionEvent) -> Iterator[FunctionEvent]:
    """Every event nested in ``event``, at any depth."""
    for child in event.cpu_children:
        yield child
        yield from descendants(child)


def moves_bytes(event: FunctionEvent, family: str) -> bool:
    """Whether the bytes of ``event`` (of ``family``) are counted: not a
    view and no descendant of the same family (which would count them)."""
    return family != VIEW and not any(
        is_counted(d) and op_family(d.name) == family
        for d in descendants(event))


def profiler_records_dtypes() -> bool:
    """Whether this PyTorch's profiler events record their inputs' dtypes,
    which :func:`event_bytes` reads (``FunctionEvent.input_dtypes``: not in
    2.6, 2.7 or 2.10)."""
    return 'input_dtypes' in inspect.signature(FunctionEvent).parameters


def require_event_dtypes() -> None:
    """Raise a ``RuntimeError`` naming the fix if this PyTorch's profiler
    events do not record their inputs' dtypes
    (:func:`profiler_records_dtypes`)."""
    if not profiler_records_dtypes():
        raise RuntimeError(
            f"the op profile needs the dtypes of the ops' inputs, which the "
            f'profiler of torch {torch.__version__} does not record: run it '
            f'with a newer torch (tested with 2.13)')


def event_bytes(event: FunctionEvent, family: str) -> int:
    """Estimated bytes an op moves (see the module docstring)."""
    sizes = [
        math.prod(shape) * ELEMENT_BYTES[dtype]
        for shape, dtype in zip(event.input_shapes, event.input_dtypes)
        if dtype in ELEMENT_BYTES
    ]
    output = (
        max(sizes, default=0) if family in SAME_SIZE_OUTPUT
        and not event.name.endswith('_') else 0)
    return sum(sizes) + output


def attention_flops(shapes: Sequence[Sequence[int]]) -> int:
    """FLOPs of attention with query, key and value of ``shapes[:3]``
    (``(..., L, E)``): two products, 2 flops per multiply-add."""
    query, key, value = shapes[:3]
    batch = math.prod(query[:-2])
    return 2 * batch * query[-2] * key[-2] * (query[-1] + value[-1])


def linear_flops(shapes: Sequence[Sequence[int]]) -> int:
    """FLOPs of a linear layer with input and weight of ``shapes[:2]``
    (``(..., in)`` and ``(out, in)``), 2 flops per multiply-add."""
    x, weight = shapes[:2]
    return 2 * math.prod(x) * weight[0]


def event_flops(event: FunctionEvent) -> int:
    """FLOPs of an op: the profiler's count, or for a fused attention
    kernel :func:`attention_flops` of its inputs and for oneDNN's linear
    :func:`linear_flops`."""
    if FUSED_ATTENTION.fullmatch(event.name):
        return attention_flops(event.input_shapes)
    if event.name == LINEAR_POINTWISE:
        return linear_flops(event.input_shapes)
    return event.flops or 0


@dataclass
class Tally:
    """What the ops of one family add up to.

    Attributes:
        self_us: Self CPU time, in µs.
        flops: FLOPs (see :func:`event_flops`).
        bytes: Estimated bytes moved (see :func:`event_bytes`).
        elements: Input elements of the :data:`RATED_OPS`, by op name.
    """
    self_us: float = 0.0
    flops: int = 0
    bytes: int = 0
    elements: Dict[str, int] = field(default_factory=dict)


def tally(events: Sequence[FunctionEvent]) -> Dict[str, Tally]:
    """Add up the ops of profiler ``events`` by family (:func:`is_counted`).

    Returns:
        A :class:`Tally` for every family of :data:`FAMILIES`.
    """
    tallies = {family: Tally() for family in FAMILIES}
    for event in filter(is_counted, events):
        family = op_family(event.name)
        totals = tallies[family]
        totals.self_us += event.self_cpu_time_total
        totals.flops += event_flops(event)
        if moves_bytes(event, family):
            totals.bytes += event_bytes(event, family)
        if event.name in RATED_OPS:
            totals.elements[event.name] = (
                totals.elements.get(event.name, 0) +
                math.prod(event.input_shapes[0]))
    return tallies


class Roofline(NamedTuple):
    """The machine's rates, measured in the run's process.

    Attributes:
        matmul_flops: FLOP/s of a large matmul in one precision.
        bandwidth: Bytes/s of a large tensor copy (read + write).
        element_rates: Elements/s of each of the :data:`RATED_OPS` in the
            same precision (:func:`element_rate`).
    """
    matmul_flops: float
    bandwidth: float
    element_rates: Mapping[str, float] = {}

    def floor_s(self, totals: Tally) -> float:
        """Seconds a family's ops take at least: the largest of their
        FLOPs at the matmul rate, their bytes at the bandwidth and the
        elements of their rated ops at those ops' rates."""
        rated = sum(elements / self.element_rates[op]
                    for op, elements in totals.elements.items())
        return max(totals.flops / self.matmul_flops,
                   totals.bytes / self.bandwidth, rated)


def matmul_rate(dtype: torch.dtype,
                size: int,
                device: torch.device,
                repeats: int = 3) -> float:
    """FLOP/s of a ``size``³ ``torch.mm`` in ``dtype`` (2 flops per
    multiply-add), the best of ``repeats`` calls after one untimed."""
    seconds = best_time(matmul_step(dtype, size, device), device, repeats)
    return matmul_flops(size) / seconds


def element_rate(op: Callable[[torch.Tensor], torch.Tensor],
                 dtype: torch.dtype,
                 device: torch.device,
                 sizes: Sequence[int] = (2**20, 2**22, 2**24),
                 repeats: int = 3) -> float:
    """Elements/s of ``op`` on a ``dtype`` tensor: the best over tensors of
    ``sizes`` elements (on small ones the threads' start-up weighs, on
    large ones the memory) of the best of ``repeats`` calls each, after
    one untimed."""
    rates = []
    for size in sizes:
        x = torch.randn(size, device=device).to(dtype)
        rates.append(size / best_time(lambda: op(x), device, repeats))
    return max(rates)


def copy_bandwidth(nbytes: int,
                   device: torch.device,
                   repeats: int = 3) -> float:
    """Bytes/s of ``dst.copy_(src)`` between float32 tensors of
    ``nbytes`` each, counting the bytes read and written; the best of
    ``repeats`` copies after one untimed (which faults the pages in)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = best_time(lambda: dst.copy_(src), device, repeats)
    return 2 * src.nbytes / seconds


def family_rows(tallies: Dict[str, Tally], roofline: Roofline,
                calls: int) -> List[dict]:
    """The table of one profile: every family with self time, per call.

    Args:
        tallies: The families' totals over ``calls`` profiled forwards.
        roofline: The rates of the profile's precision.
        calls: Profiled forwards the totals add up.

    Returns:
        ``family``, ``ms``, ``share`` (% of all ``aten`` self time),
        ``gflops``, ``mb``, ``floor_ms`` and ``x_floor`` (``ms`` over
        ``floor_ms``; both None where the floor is zero), in the order of
        :data:`FAMILIES`.
    """
    total_us = sum(totals.self_us for totals in tallies.values())
    rows = []
    for family, totals in tallies.items():
        if not totals.self_us:
            continue
        ms = totals.self_us / 1e3 / calls
        floor_ms = roofline.floor_s(totals) * 1e3 / calls or None
        rows.append(
            dict(
                family=family,
                ms=ms,
                share=100 * totals.self_us / total_us,
                gflops=totals.flops / 1e9 / calls,
                mb=totals.bytes / MB / calls,
                floor_ms=floor_ms,
                x_floor=ms / floor_ms if floor_ms else None))
    return rows


def family_times(ops: Sequence[OpTime]) -> List[dict]:
    """The times of :func:`~agent_mm.benchmark.ops_alone.op_times` added
    up by family.

    Returns:
        ``family``, ``in_forward_ms``, ``alone_ms`` and ``x_alone`` (in the
        forward over alone; None where alone is 0), in the order of
        :data:`FAMILIES`, families without ops left out.
    """
    totals: Dict[str, List[float]] = {}
    for op in ops:
        family = totals.setdefault(op_family(op.name), [0.0, 0.0])
        family[0] += op.in_forward_s * 1e3
        family[1] += op.alone_s * 1e3
    rows = []
    for family in filter(totals.__contains__, FAMILIES):
        in_forward, alone = totals[family]
        rows.append(
            dict(
                family=family,
                in_forward_ms=in_forward,
                alone_ms=alone,
                x_alone=in_forward / alone if alone else None))
    return rows


def profile_forward(model: nn.Module,
                    inputs: torch.Tensor,
                    warmup: int,
                    calls: int,
                    alone: int = 0) -> dict:
    """Profile eval forwards of ``model`` (already in its precision).

    Args:
        model: The model, in eval mode.
        inputs: Its input batch.
        warmup: Untimed forwards first.
        calls: Profiled forwards.
        alone: Timed re-runs of each op alone
            (:func:`~agent_mm.benchmark.ops_alone.op_times`); 0 for none.

    Returns:
        ``forward_ms`` (one unprofiled forward after the warm-up),
        ``profiled_ms`` (wall time per profiled forward), ``tallies``
        (:func:`tally` of the profiled forwards) and, with ``alone``,
        ``alone`` (:func:`family_times`).
    """
    device = inputs.device
    with torch.no_grad():
        for _ in range(warmup):
            model(inputs)
        forward_s = timed(lambda: model(inputs), device)
        with torch_profile(
                activities=[ProfilerActivity.CPU],
                record_shapes=True,
                with_flops=True) as prof:
            start = time.perf_counter()
            for _ in range(calls):
                model(inputs)
            profiled_s = time.perf_counter() - start
    result = dict(
        forward_ms=forward_s * 1e3,
        profiled_ms=profiled_s * 1e3 / calls,
        tallies=tally(prof.events()))
    if alone:
        result['alone'] = family_times(op_times(model, inputs, alone))
    return result


@dataclass(frozen=True)
class ProfileSettings:
    """What a profile run records and how (the command line's options).

    Attributes:
        models: Keys of :data:`~agent_mm.benchmark.models.MODELS`.
        sizes: Input sizes ``(H, W)``.
        dtypes: Precisions (keys of
            :data:`~agent_mm.benchmark.models.DTYPES`).
        batch: Batch size.
        warmup: Untimed forwards before each profile (2 fills the bias
            cache, which keeps a shape's maps from its second forward on).
        calls: Profiled forwards per model, size and precision.
        threads: ``torch.set_num_threads``.
        seed: ``torch.manual_seed`` before the models are built.
        matmul_size: Side of the matmul whose rate is the GEMM roofline.
        copy_mb: MB of the tensor copied to measure the bandwidth.
        alone: Timed re-runs of each op alone in one more forward
            (:mod:`agent_mm.benchmark.ops_alone`); 0 for none.
    """
    models: Sequence[str]
    sizes: Sequence[Size]
    dtypes: Sequence[str]
    batch: int = 1
    warmup: int = 2
    calls: int = 1
    threads: int = 1
    seed: int = 0
    matmul_size: int = MATMUL_SIZE
    copy_mb: int = 256
    alone: int = 0


def profile_meta(settings: ProfileSettings,
                 rooflines: Dict[str, Roofline]) -> dict:
    """How a run measured, with the rates of its ``rooflines`` (by
    precision): ``matmul_gflops`` and ``gelements_s`` (of each rated op) by
    precision, and ``bandwidth_gb_s``."""
    return dict(
        device=str(CPU),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        batch=settings.batch,
        warmup=settings.warmup,
        calls=settings.calls,
        matmul_size=settings.matmul_size,
        copy_mb=settings.copy_mb,
        alone=settings.alone,
        matmul_gflops={
            dtype: roofline.matmul_flops / 1e9
            for dtype, roofline in rooflines.items()
        },
        gelements_s={
            dtype: {
                op: rate / 1e9
                for op, rate in roofline.element_rates.items()
            }
            for dtype, roofline in rooflines.items()
        },
        bandwidth_gb_s=rooflines[settings.dtypes[0]].bandwidth / 1e9)


def profile_model(key: str, settings: ProfileSettings,
                  rooflines: Dict[str, Roofline]) -> List[dict]:
    """Build model ``key`` and profile it at every size and precision.

    Returns:
        One profile per size and precision: ``model``, ``size``,
        ``dtype``, ``forward_ms``, ``profiled_ms``, ``aten_ms`` (self time
        of the ops counted, :func:`is_counted`, per forward; the name kept
        from when only ``aten`` ops were), ``roofline_ms`` (the GEMM
        roofline), ``families`` (:func:`family_rows`) and, with
        ``settings.alone``, ``alone`` (:func:`family_times`).
    """
    model = build_models([key], CPU)[key]
    profiles = []
    for size in settings.sizes:
        inputs = torch.randn(settings.batch, 3, *size)
        for dtype in settings.dtypes:
            model.eval()  # drop the bias caches of other sizes and dtypes
            result = profile_forward(
                in_precision(model, dtype, CPU), inputs, settings.warmup,
                settings.calls, settings.alone)
            tallies = result.pop('tallies')
            products = sum(tallies[family].flops for family in PRODUCTS)
            profiles.append(
                dict(
                    model=key,
                    size=list(size),
                    dtype=dtype,
                    **result,
                    aten_ms=sum(t.self_us for t in tallies.values()) / 1e3 /
                    settings.calls,
                    roofline_ms=products / rooflines[dtype].matmul_flops *
                    1e3 / settings.calls,
                    families=family_rows(tallies, rooflines[dtype],
                                         settings.calls)))
            log(f'profiled {key} {size_text(size)} {dtype}')
    return profiles


def machine_rooflines(settings: ProfileSettings) -> Dict[str, Roofline]:
    """The :class:`Roofline` of each of ``settings.dtypes``, measured here
    (one copy bandwidth for all)."""
    bandwidth = copy_bandwidth(settings.copy_mb * MB, CPU)
    return {
        dtype: Roofline(
            matmul_rate(DTYPES[dtype], settings.matmul_size, CPU), bandwidth,
            {
                name: element_rate(op, DTYPES[dtype], CPU)
                for name, op in RATED_OPS.items()
            })
        for dtype in settings.dtypes
    }


def run_profiles(settings: ProfileSettings) -> dict:
    """Measure the machine's rates, then profile every model.

    Sets torch's threads and seed first; runs on the CPU.

    Returns:
        ``meta`` (how the run measured, with the rates: see
        :func:`profile_meta`) and ``profiles`` (see
        :func:`profile_model`).

    Raises:
        ValueError: If ``settings.dtypes`` are not distinct known
            precisions.
        RuntimeError: If this PyTorch's profiler records no dtypes
            (:func:`require_event_dtypes`).
    """
    check_dtypes(settings.dtypes)
    require_event_dtypes()
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    rooflines = machine_rooflines(settings)
    meta = profile_meta(settings, rooflines)
    log('rates: ' + ', '.join(f'{dtype} {rate:.0f} GFLOP/s'
                              for dtype, rate in meta['matmul_gflops'].items())
        + f", copy {meta['bandwidth_gb_s']:.1f} GB/s; "
        + element_rates_text(meta['gelements_s']))
    profiles = []
    for key in settings.models:
        profiles += profile_model(key, settings, rooflines)
    return dict(meta=meta, profiles=profiles)


def fmt(value: Optional[float], spec: str) -> str:
    """``value`` formatted with ``spec``, ``'n/a'`` for None."""
    return 'n/a' if value is None else format(value, spec)


def profile_table(profile: dict) -> List[str]:
    """The section of one model, size and precision."""
    families = profile['families']
    floor_ms = sum(row['floor_ms'] or 0 for row in families)
    lines = [
        '', f"## {MODELS[profile['model']].label}, "
        f"{size_text(profile['size'])}, {profile['dtype']}", '',
        f"Forward {profile['forward_ms']:.1f} ms unprofiled, "
        f"{profile['profiled_ms']:.1f} ms profiled, of which the ops' self "
        f"time {profile['aten_ms']:.1f} ms. GEMM roofline (the products' "
        f"FLOPs at the matmul rate): {profile['roofline_ms']:.1f} ms, "
        f"{100 * profile['roofline_ms'] / profile['forward_ms']:.0f} % of "
        'the unprofiled forward.', '',
        '| Family | ms | Share | Floor ms | × floor |',
        '|---|---:|---:|---:|---:|'
    ]
    lines += [
        f"| {row['family']} | {row['ms']:.1f} | {row['share']:.1f} % "
        f"| {fmt(row['floor_ms'], '.1f')} | {fmt(row['x_floor'], '.2f')} |"
        for row in families
    ]
    x_floor = profile['aten_ms'] / floor_ms if floor_ms else None
    lines.append(f"| total | {profile['aten_ms']:.1f} | 100.0 % "
                 f"| {floor_ms:.1f} | {fmt(x_floor, '.2f')} |")
    if 'alone' in profile:
        lines += alone_table(profile['alone'], profile['roofline_ms'])
    return lines


def alone_table(rows: List[dict], roofline_ms: float) -> List[str]:
    """The ops of one more forward by family, timed in it and alone
    (:func:`family_times`), with the GEMM roofline's share of each total."""
    in_forward = sum(row['in_forward_ms'] for row in rows)
    alone = sum(row['alone_ms'] for row in rows)
    lines = [
        '', 'Each op of one more forward, timed in it and re-run alone on '
        'copies of its arguments (median): the ops add up to '
        f'{in_forward:.1f} ms in the forward and {alone:.1f} ms alone; the '
        f'roofline is {100 * roofline_ms / in_forward:.0f} % and '
        f'{100 * roofline_ms / alone:.0f} % of them.', '',
        '| Family | In forward ms | Alone ms | × alone |',
        '|---|---:|---:|---:|'
    ]
    lines += [
        f"| {row['family']} | {row['in_forward_ms']:.1f} "
        f"| {row['alone_ms']:.1f} | {fmt(row['x_alone'], '.2f')} |"
        for row in rows
    ]
    return lines


def element_rates_text(gelements_s: Dict[str, Dict[str, float]]) -> str:
    """The rated ops' rates of :func:`profile_meta`, e.g. ``'gelu float32
    4.61, bfloat16 4.30 G elements/s'``."""
    return '; '.join(
        f"{op.replace('aten::', '')} " + ', '.join(
            f'{dtype} {ops[op]:.2f}' for dtype, ops in gelements_s.items()) +
        ' G elements/s' for op in RATED_OPS)


def markdown(results: dict) -> str:
    """The report (``profile.md``) of :func:`run_profiles`' results."""
    meta = results['meta']
    rates = ', '.join(f'{dtype} {gflops:.0f} GFLOP/s'
                      for dtype, gflops in meta['matmul_gflops'].items())
    lines = [
        '# Eval forward by op family', '',
        f"{meta['device']}, {meta['threads']} threads, torch "
        f"{meta['torch']}, batch {meta['batch']}; each profile: "
        f"{meta['calls']} profiled forward(s) (no_grad) after "
        f"{meta['warmup']} untimed. Measured in the same process: matmul "
        f"{meta['matmul_size']}³ {rates}; copy bandwidth "
        f"{meta['bandwidth_gb_s']:.1f} GB/s ({meta['copy_mb']} MB copy_, "
        f'read + write); {element_rates_text(meta["gelements_s"])}.',
        'ms: self CPU time of the family\'s ops per forward; floor: '
        'the largest of its FLOPs at the matmul rate, its estimated bytes '
        'at the copy bandwidth and its compute-bound ops\' elements at '
        'their rates (method and approximations: '
        '`agent_mm/benchmark/profile.py`).'
    ]
    for profile in results['profiles']:
        lines += profile_table(profile)
    return '\n'.join(lines) + '\n'


def write_profile(results: dict, path: str) -> str:
    """Write the report to ``path`` (markdown) and the results beside it
    (same name, ``.json``); returns the markdown."""
    table = markdown(results)
    with open(path, 'w') as f:
        f.write(table)
    with open(osp.splitext(path)[0] + '.json', 'w') as f:
        json.dump(results, f, indent=1)
    return table
