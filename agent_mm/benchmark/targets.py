"""What one run is judged by: the acceptance targets, the FLOP check and
the time of the lower precisions over float32.

Each target is a ratio of two measurements of the same run with the bound
it should meet (at most, or at least for the GEMM roofline's share);
:data:`TARGETS` is the one list of them (key, description, bound and how
the value is read from the run's rows). Targets comparing two models, and
the FLOP checks, read the rows of one precision (see :func:`rows_in`); the
precision targets compare a model's bfloat16 and float32 rows, and the
roofline target reads a float32 row and the product rate timed beside it.
"""
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from .models import FLOAT32, MODELS, Size

BFLOAT16 = 'bfloat16'

Rows = List[dict]
# a row's model key and input size
RowKey = Tuple[str, Sequence[int]]

# the model and sizes of the scaling target, timed alternately
SCALING_MODEL = 'agent_pvt_t'
TARGET_SCALING = ((1024, 1024), (2048, 2048))
FAST, REFERENCE = 'agent_pvt_t', 'agent_pvt_t_ref'
S512, S1024 = (512, 512), (1024, 1024)
S800 = (800, 1344)  # 800×1333 padded to 32, as mmdet's test pipeline does


class Run(NamedTuple):
    """The measurements of one run the targets are read from.

    Attributes:
        eval_rows: Rows of the eval measurements, in every precision.
        train_rows: Rows of the train measurements, in every precision.
        scaling: The alternating pair of :data:`SCALING_MODEL`, if timed.
        dtype: The precision whose rows the model comparisons read.
    """
    eval_rows: Rows
    train_rows: Rows
    scaling: Optional[dict]
    dtype: str = FLOAT32

    def rows(self, mode: str) -> Rows:
        """The rows of ``mode`` (``'eval'`` or ``'train'``)."""
        return self.train_rows if mode == 'train' else self.eval_rows


def rows_in(rows: Rows, dtype: str) -> Rows:
    """The rows measured in precision ``dtype``."""
    return [row for row in rows if row['dtype'] == dtype]


def find_row(rows: Rows, model: str, size: Sequence[int]) -> Optional[dict]:
    """The row of ``model`` at ``size``, None if there is none."""
    for row in rows:
        if row['model'] == model and tuple(row['size']) == tuple(size):
            return row
    return None


def ratio(rows: Rows, field: str, num: RowKey,
          den: RowKey) -> Optional[float]:
    """``field`` of one row over another's.

    Args:
        rows: The rows to look in.
        field: A row field.
        num: ``(model, size)`` of the numerator's row.
        den: ``(model, size)`` of the denominator's row.

    Returns:
        The ratio, None when either row is missing or the denominator is
        zero or None.
    """
    top, bottom = find_row(rows, *num), find_row(rows, *den)
    if top is None or bottom is None or not bottom[field]:
        return None
    return top[field] / bottom[field]


class RowRatio(NamedTuple):
    """A target's value: one model's ``field`` over another's at one size.

    Attributes:
        mode: ``'eval'`` or ``'train'``: which rows of the run.
        field: See :func:`ratio`.
        numerator: Key of the numerator's model.
        denominator: Key of the denominator's model.
        size: The input size of both rows.
    """
    mode: str
    field: str
    numerator: str
    denominator: str
    size: Size

    def __call__(self, run: Run) -> Optional[float]:
        """The ratio in ``run``'s precision, None if not measured."""
        return ratio(
            rows_in(run.rows(self.mode), run.dtype), self.field,
            (self.numerator, self.size), (self.denominator, self.size))


class PrecisionRatio(NamedTuple):
    """A target's value: one model's time in bfloat16 over its time in
    float32, at one size.

    Attributes:
        mode: ``'eval'`` or ``'train'``: which rows of the run.
        model: Key of the model.
        size: The input size of both rows.
    """
    mode: str
    model: str
    size: Size

    def __call__(self, run: Run) -> Optional[float]:
        """The ratio in ``run`` (as :func:`precision_ratios` pairs the
        rows), None unless both precisions ran."""
        wanted = (self.model, list(self.size), BFLOAT16)
        return next((entry['ratio']
                     for entry in precision_ratios(run.rows(self.mode),
                                                   self.mode)
                     if (entry['model'], list(entry['size']),
                         entry['dtype']) == wanted), None)


def roofline_share(row: dict) -> Optional[float]:
    """The GEMM roofline of an eval row over its time: its FLOPs
    (multiply-adds) at the rate of the product timed in the same rounds
    (``matmul_gflops``, 2 flops per multiply-add), over its median time;
    None where either was not measured (as in runs before the rate was)."""
    rate = row.get('matmul_gflops')
    if row.get('flops') is None or not rate:
        return None
    roofline_ms = 2 * row['flops'] / rate / 1e6
    return roofline_ms / row['median_ms']


class RooflineShare(NamedTuple):
    """A target's value: :func:`roofline_share` of one model's float32 eval
    row at one size (whatever precision the run compares models in).

    Attributes:
        model: Key of the model.
        size: The input size of the row.
    """
    model: str
    size: Size

    def __call__(self, run: Run) -> Optional[float]:
        """The share in ``run``, None if not measured."""
        row = find_row(rows_in(run.eval_rows, FLOAT32), self.model,
                       self.size)
        return None if row is None else roofline_share(row)


def scaling_ratio(run: Run) -> Optional[float]:
    """The interleaved 2048² / 1024² ratio, None if not measured at those
    sizes."""
    wanted = [list(size) for size in TARGET_SCALING]
    if run.scaling is None or run.scaling['sizes'] != wanted:
        return None
    return run.scaling['ratio']


class Target(NamedTuple):
    """A ratio measured in one run and the bound it should meet.

    Attributes:
        key: Name of the ratio in the results.
        description: Its row label in the ratios table.
        bound: The target: the ratio should be at most this (at least
            with ``at_least``).
        value: Reads the ratio from a :class:`Run` (None if not measured).
        at_least: Whether ``bound`` is a lower bound.
    """
    key: str
    description: str
    bound: float
    value: Callable[[Run], Optional[float]]
    at_least: bool = False

    def met(self, value: float) -> bool:
        """Whether ``value`` meets the bound."""
        return value >= self.bound if self.at_least else value <= self.bound

    def bound_text(self) -> str:
        """The bound as the ratios table shows it, e.g. ``'≤ 0.4'``."""
        return f"{'≥' if self.at_least else '≤'} {self.bound}"


TARGETS = (
    Target('pvt_t_eval_time_fast_over_ref',
           'Agent-PVT-T eval 1024²: fast / reference forward time', 0.5,
           RowRatio('eval', 'median_ms', FAST, REFERENCE, S1024)),
    Target('pvt_t_eval_mem_fast_over_ref',
           'Agent-PVT-T eval 1024²: fast / reference peak memory of a '
           'warm call (the fast path\'s bias cache, held between calls, '
           'apart)', 1.0,
           RowRatio('eval', 'peak_mb', FAST, REFERENCE, S1024)),
    Target('pvt_t_train_time_fast_over_ref',
           'Agent-PVT-T train 512² (fwd+bwd): fast / reference time', 1.0,
           RowRatio('train', 'median_ms', FAST, REFERENCE, S512)),
    Target('pvt_t_train_mem_fast_over_ref',
           'Agent-PVT-T train 512² (fwd+bwd): fast / reference peak memory',
           0.75, RowRatio('train', 'peak_mb', FAST, REFERENCE, S512)),
    Target('pvt_t_eval_roofline_share_fp32',
           'Agent-PVT-T eval 1024², float32: GEMM roofline / forward time',
           0.65,
           RooflineShare(FAST, S1024),
           at_least=True),
    Target('pvt_t_eval_time_bf16_over_fp32',
           'Agent-PVT-T eval 1024²: bfloat16 / float32 forward time', 0.4,
           PrecisionRatio('eval', FAST, S1024)),
    Target('pvt_t_train_time_bf16_over_fp32',
           'Agent-PVT-T train 512² (fwd+bwd): bfloat16 / float32 time', 0.6,
           PrecisionRatio('train', FAST, S512)),
    Target('swin_t_time_agent_over_mmdet',
           'Agent-Swin-T / mmdet Swin-T forward time at 800×1344', 0.8,
           RowRatio('eval', 'median_ms', 'agent_swin_t', 'swin_t', S800)),
    Target('pvt_t_time_2048_over_1024',
           'Agent-PVT-T forward time 2048² / 1024² (sizes alternating)',
           4.5, scaling_ratio),
    Target('pvt_s_time_agent_over_mmdet',
           'Agent-PVT-S (fast) / mmdet PVT-S forward time at 1024²', 1.0,
           RowRatio('eval', 'median_ms', 'agent_pvt_s', 'pvt_s', S1024)),
)


def target_ratios(eval_rows: Rows,
                  train_rows: Rows,
                  scaling: Optional[dict],
                  dtype: str = FLOAT32) -> Dict[str, Optional[float]]:
    """The value of every target of :data:`TARGETS` in one run, by key; the
    model comparisons read the rows of precision ``dtype``."""
    run = Run(eval_rows, train_rows, scaling, dtype)
    return {target.key: target.value(run) for target in TARGETS}


def flop_checks(eval_rows: Rows, tolerance: float = 0.05) -> List[dict]:
    """Compare the FLOPs of each fast model and its reference twin outside
    attention and bias resizing: whether the two were built as the same
    network. (Both are counted on the traced path of agent attention, see
    :mod:`.measure`, so this does not compare the two attention paths;
    attention counting is covered by the unit tests.)

    Args:
        eval_rows: Rows of the eval measurements.
        tolerance: The largest relative difference that is ok.

    Returns:
        One check per reference-path row whose fast twin has a row of the
        same size and both have FLOPs: ``model`` (the fast one), ``size``,
        ``fast_gflops``, ``reference_gflops``, ``relative_difference`` and
        ``ok``.
    """
    checks = []
    for row in eval_rows:
        twin = MODELS[row['model']].reference_of
        fast = find_row(eval_rows, twin, row['size']) if twin else None
        if fast is None or None in (fast['flops'], row['flops']):
            continue
        fast_flops, ref_flops = fast['layer_flops'], row['layer_flops']
        rel = fast_flops / ref_flops - 1
        checks.append(
            dict(
                model=twin,
                size=row['size'],
                fast_gflops=fast_flops / 1e9,
                reference_gflops=ref_flops / 1e9,
                relative_difference=rel,
                ok=abs(rel) <= tolerance))
    return checks


def precision_ratios(rows: Rows, mode: str) -> List[dict]:
    """Time of every lower-precision row over the float32 row of the same
    model and size.

    Args:
        rows: Rows of one mode, in any precisions.
        mode: ``'eval'`` or ``'train'``, copied to the results.

    Returns:
        One entry per row not in float32 whose float32 twin was measured:
        ``mode``, ``model``, ``size``, ``dtype``, ``float32_ms``,
        ``median_ms`` and ``ratio`` (``median_ms / float32_ms``).
    """
    base = rows_in(rows, FLOAT32)
    ratios = []
    for row in rows:
        twin = find_row(base, row['model'], row['size'])
        if row['dtype'] == FLOAT32 or twin is None:
            continue
        ratios.append(
            dict(
                mode=mode,
                model=row['model'],
                size=row['size'],
                dtype=row['dtype'],
                float32_ms=twin['median_ms'],
                median_ms=row['median_ms'],
                ratio=row['median_ms'] / twin['median_ms']))
    return ratios
