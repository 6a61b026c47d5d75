"""Benchmark the agent backbones against mmdet's PVT and Swin, and the fast
agent-attention path against the reference one.

For every model and input size it reports forward latency (eval, no_grad),
peak memory, parameters and FLOPs, and forward+backward latency and peak
memory in train mode. Models are measured round-robin (one call of each per
repeat, in a rotating order) so load from other processes hits all of them.
The scaling of Agent-PVT-T's forward time with the input size is timed the
same way, its two sizes alternating.

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

FLOPs come from mmengine's ``FlopAnalyzer`` (one multiply-add = one flop)
with handles for ``scaled_dot_product_attention`` and ``baddbmm``; they are
counted on a cold model, so the fast path's bias computation is included.

Example::

    python tools/analysis_tools/benchmark_backbones.py --repeats 3
    python tools/analysis_tools/benchmark_backbones.py --sizes 64 96x128 \
        --train-sizes 64 --scaling-sizes 64 128 --repeats 1 --warmup 0
"""
import argparse
import json
import os
import os.path as osp
import platform
import statistics
import sys
import time
from functools import partial
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from agent_mm.models import AgentPVT, AgentSwinTransformer
from agent_mm.utils.flops import flop_analyzer
from agent_mm.utils.timing import (eval_step, interleaved_times, peak_bytes,
                                   train_step)

Size = Tuple[int, int]
MB = 2**20
# ops where the two attention paths differ: the reference resizes biases
# with interpolation and attends with matmuls, the fast path resizes with
# matrix products (matmul, bmm) and attends with SDPA
PATH_SPECIFIC_OPS = ('upsample_bilinear2d', 'matmul', 'bmm',
                     'scaled_dot_product_attention')
DEFAULT_SIZES = ('512', '1024', '1536', '2048', '800x1333')

# Backbone settings of mmdet's configs/pvt/retinanet_pvt-{t,s}_fpn_1x_coco.py
# and configs/swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py.
MMDET_PVT_T = dict(num_layers=[2, 2, 2, 2])
MMDET_PVT_S = dict(num_layers=[3, 4, 6, 3])
MMDET_SWIN_T = dict(
    embed_dims=96,
    depths=[2, 2, 6, 2],
    num_heads=[3, 6, 12, 24],
    window_size=7,
    mlp_ratio=4,
    qkv_bias=True,
    qk_scale=None,
    drop_rate=0.,
    attn_drop_rate=0.,
    drop_path_rate=0.2,
    patch_norm=True,
    out_indices=(0, 1, 2, 3),
    with_cp=False,
    convert_weights=True)


class ModelSpec(NamedTuple):
    """A benchmarked backbone.

    Attributes:
        label: Name in tables and plots.
        build: Builds the backbone (random weights).
        reference_of: For a reference-path model, the key of the fast model
            whose weights it copies; its fast/reference ratio is reported.
        baseline: For an agent model, the key of the mmdet model it is
            compared with.
    """
    label: str
    build: Callable[[], nn.Module]
    reference_of: Optional[str] = None
    baseline: Optional[str] = None


def _mmdet_backbone(name: str, **kwargs) -> nn.Module:
    """An mmdet backbone class built with ``kwargs`` (imported lazily)."""
    from mmdet.models import backbones
    return getattr(backbones, name)(**kwargs)


def _trio(key: str, label: str, agent: Callable[..., nn.Module],
          baseline_key: str, baseline_label: str,
          baseline: Callable[[], nn.Module]) -> Dict[str, ModelSpec]:
    """An agent backbone, its reference-path twin and its mmdet baseline."""
    return {
        key:
        ModelSpec(label, agent, baseline=baseline_key),
        f'{key}_ref':
        ModelSpec(f'{label} (reference)',
                  partial(agent, attn_impl='reference'),
                  reference_of=key),
        baseline_key:
        ModelSpec(baseline_label, baseline),
    }


MODELS: Dict[str, ModelSpec] = {
    **_trio('agent_pvt_t', 'Agent-PVT-T', partial(AgentPVT, arch='tiny'),
            'pvt_t', 'PVT-T (mmdet)',
            partial(_mmdet_backbone, 'PyramidVisionTransformer',
                    **MMDET_PVT_T)),
    'agent_pvt_t_nocache':
    ModelSpec('Agent-PVT-T (bias cache off)',
              partial(AgentPVT, arch='tiny', bias_cache_size=0)),
    **_trio('agent_pvt_s', 'Agent-PVT-S', partial(AgentPVT, arch='small'),
            'pvt_s', 'PVT-S (mmdet)',
            partial(_mmdet_backbone, 'PyramidVisionTransformer',
                    **MMDET_PVT_S)),
    **_trio('agent_swin_t', 'Agent-Swin-T',
            partial(AgentSwinTransformer, arch='tiny'), 'swin_t',
            'Swin-T (mmdet)',
            partial(_mmdet_backbone, 'SwinTransformer', **MMDET_SWIN_T)),
}


class Target(NamedTuple):
    """A ratio measured in one run and the bound it should meet."""
    key: str
    description: str
    bound: float


TARGETS = (
    Target('pvt_t_eval_time_fast_over_ref',
           'Agent-PVT-T eval 1024²: fast / reference forward time', 0.5),
    Target('pvt_t_eval_mem_fast_over_ref',
           'Agent-PVT-T eval 1024²: fast / reference peak memory', 1.0),
    Target(
        'pvt_t_eval_footprint_fast_over_ref',
        'Agent-PVT-T eval 1024²: fast (peak + bias cache) / reference peak',
        1.0),
    Target('pvt_t_train_time_fast_over_ref',
           'Agent-PVT-T train 512² (fwd+bwd): fast / reference time', 0.7),
    Target('pvt_t_train_mem_fast_over_ref',
           'Agent-PVT-T train 512² (fwd+bwd): fast / reference peak memory',
           0.8),
    Target('pvt_t_time_2048_over_1024',
           'Agent-PVT-T forward time 2048² / 1024² (sizes alternating)',
           4.5),
    Target('pvt_s_time_agent_over_mmdet',
           'Agent-PVT-S (fast) / mmdet PVT-S forward time at 1024²', 1.0),
)

# the model and sizes of the scaling target, timed alternately
SCALING_MODEL = 'agent_pvt_t'
TARGET_SCALING = ((1024, 1024), (2048, 2048))

# ----------------------------------------------------------------------
# command line
def parse_size(text: str) -> Size:
    """``'512'`` → ``(512, 512)``; ``'800x1333'`` → ``(800, 1333)`` (H×W)."""
    parts = text.lower().split('x')
    if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(
            f'size must be N or HxW (e.g. 512, 800x1333), got {text!r}')
    height, width = int(parts[0]), int(parts[-1])
    return height, width


def parse_limit(text: str) -> Tuple[str, int]:
    """``'pvt_s=147456'`` → ``('pvt_s', 147456)``."""
    model, _, tokens = text.partition('=')
    if model not in MODELS or not tokens.isdigit():
        raise argparse.ArgumentTypeError(
            f'expected MODEL=TOKENS with MODEL in {list(MODELS)}, got '
            f'{text!r}')
    return model, int(tokens)


def available_cores() -> int:
    """Cores this process may run on."""
    if hasattr(os, 'sched_getaffinity'):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Benchmark agent backbones vs mmdet PVT/Swin and the '
        'fast vs reference agent attention.')
    parser.add_argument(
        '--sizes',
        nargs='+',
        type=parse_size,
        default=[parse_size(s) for s in DEFAULT_SIZES],
        help='eval input sizes, N or HxW (default: ' +
        ' '.join(DEFAULT_SIZES) + ')')
    parser.add_argument(
        '--train-sizes',
        nargs='*',
        type=parse_size,
        default=[(512, 512)],
        help='fwd+bwd input sizes; none to skip training')
    parser.add_argument('--batch', type=int, default=1, help='eval batch')
    parser.add_argument(
        '--train-batch', type=int, default=2, help='fwd+bwd batch')
    parser.add_argument(
        '--repeats', type=int, default=5, help='timed calls per model')
    parser.add_argument(
        '--warmup',
        type=int,
        default=1,
        help='untimed calls of a model right before each timed one')
    parser.add_argument(
        '--models',
        nargs='+',
        choices=list(MODELS),
        default=list(MODELS),
        metavar='MODEL',
        help='models to run, from ' + ', '.join(MODELS) + ' (default: all)')
    parser.add_argument('--device', default='cpu', help='cpu or cuda[:i]')
    parser.add_argument(
        '--threads',
        type=int,
        default=available_cores(),
        help='torch.set_num_threads (default: all cores, %(default)s)')
    parser.add_argument(
        '--flops-max-peak-mb',
        type=float,
        help='skip FLOP counting of a model whose measured forward peak '
        'memory exceeds this; tracing needs ~1.6× a forward\'s memory, '
        'e.g. ~20 GB for mmdet PVT at 2048² (default: count all)')
    parser.add_argument(
        '--max-tokens',
        nargs='+',
        type=parse_limit,
        default=[],
        metavar='MODEL=TOKENS',
        help='skip MODEL at inputs of more tokens (H·W/16), e.g. '
        'pvt_t=147456 pvt_s=147456 keeps mmdet PVT, whose stage-1 '
        'attention is quadratic, below 2048² (~20 GB there)')
    parser.add_argument(
        '--scaling-sizes',
        nargs='*',
        type=parse_size,
        default=list(TARGET_SCALING),
        metavar='SIZE',
        help='two eval sizes at which Agent-PVT-T (fast) is timed '
        'alternately for the scaling ratio (default: 1024 2048); none to '
        'skip')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument(
        '--out-dir',
        default=osp.join('work_dirs', 'benchmark'),
        help='where benchmark.md/.json/latency_vs_tokens.png go')
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error('--repeats must be ≥ 1 and --warmup ≥ 0')
    scaling = args.scaling_sizes
    if len(scaling) not in (0, 2) or len(set(scaling)) < len(scaling):
        parser.error('--scaling-sizes takes two different sizes (or none to '
                     f'skip), got {len(scaling)}')
    return args


# ----------------------------------------------------------------------
# measurements
def log(message: str) -> None:
    """Progress on stderr (stdout carries the table)."""
    print(
        f'[{time.strftime("%H:%M:%S")}] {message}',
        file=sys.stderr,
        flush=True)


def count_flops(model: nn.Module,
                inputs: Tensor) -> Tuple[int, int, List[str]]:
    """FLOPs (multiply-adds) of one cold eval forward, the part of them
    outside :data:`PATH_SPECIFIC_OPS` (projections, MLPs, convs, norms) and
    the op kinds the analyzer could not count."""
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
    return max_peak_mb is None or peak_mb <= max_peak_mb


def bias_cache_bytes(model: nn.Module) -> int:
    """Bytes held by the eval-mode bias caches of the agent attentions."""
    return sum(tensor.numel() * tensor.element_size()
               for module in model.modules()
               for biases in getattr(module, '_bias_cache', {}).values()
               for tensor in biases)


# ----------------------------------------------------------------------
# runs
def build_models(keys: Sequence[str],
                 device: torch.device) -> Dict[str, nn.Module]:
    """Build the models; a reference model gets its fast twin's weights."""
    models = {}
    for key in keys:
        model = MODELS[key].build()
        twin = MODELS[key].reference_of
        if twin in models:
            model.load_state_dict(models[twin].state_dict())
        models[key] = model.to(device)
    return models


def within_limits(models: Dict[str, nn.Module], size: Size,
                  limits: Dict[str, int]) -> Dict[str, nn.Module]:
    """The models whose ``--max-tokens`` allows ``size``."""
    tokens = size[0] * size[1] // 16
    return {
        key: model
        for key, model in models.items() if tokens <= limits.get(key, tokens)
    }


def output_differences(models: Dict[str, nn.Module],
                       inputs: Tensor) -> Dict[str, float]:
    """Max |fast − reference| over the outputs of each pair (eval)."""
    diffs = {}
    for key, model in models.items():
        twin = MODELS[key].reference_of
        if twin not in models:
            continue
        with torch.no_grad():
            pairs = zip(models[twin].eval()(inputs), model.eval()(inputs))
            diffs[twin] = max((a - b).abs().max().item() for a, b in pairs)
    return diffs


def measure(models: Dict[str, nn.Module], size: Size, batch: int, train: bool,
            args: argparse.Namespace, device: torch.device) -> List[dict]:
    """One size: interleaved latency, then peak memory (and for eval the
    bias cache and FLOPs) of every model."""
    inputs = torch.randn(batch, 3, *size, device=device)
    make_step = train_step if train else eval_step
    for model in models.values():
        model.train(train)
    steps = {key: make_step(model, inputs) for key, model in models.items()}
    load_before = os.getloadavg()[0]
    times = interleaved_times(steps, args.warmup, args.repeats, device)
    rows = []
    for key, model in models.items():
        row = dict(
            model=key,
            size=list(size),
            batch=batch,
            tokens=size[0] * size[1] // 16,
            times_ms=[t * 1e3 for t in times[key]],
            median_ms=statistics.median(times[key]) * 1e3)
        model.zero_grad(set_to_none=True)  # frees nothing while profiled
        row['peak_mb'] = peak_bytes(steps[key], device) / MB
        if not train:
            row['bias_cache_mb'] = bias_cache_bytes(model) / MB
            row['flops'], row['layer_flops'], row['unsupported_ops'] = (
                count_flops(model, inputs) if flops_wanted(
                    row['peak_mb'], args.flops_max_peak_mb) else
                (None, None, None))
        model.zero_grad(set_to_none=True)
        model.eval()  # drop this size's bias cache before the next size
        rows.append(row)
    mode = 'train' if train else 'eval'
    log(f'{mode} {size[0]}x{size[1]} done (load avg '
        f'{load_before:.1f} → {os.getloadavg()[0]:.1f})')
    return rows


def measure_scaling(key: str, model: nn.Module, sizes: Sequence[Size],
                    args: argparse.Namespace, device: torch.device) -> dict:
    """Eval forward time of model ``key`` at two sizes and the second's over
    the first's, the sizes alternating call by call so that a drift of the
    machine's speed hits both alike (the tables time sizes minutes apart)."""
    model.eval()
    steps = {
        size_text(size): eval_step(
            model, torch.randn(args.batch, 3, *size, device=device))
        for size in sizes
    }
    times = interleaved_times(steps, args.warmup, args.repeats, device)
    model.eval()  # drop the bias caches of both sizes
    medians = [statistics.median(times[step]) * 1e3 for step in steps]
    log(f'scaling {" / ".join(steps)} done')
    return dict(
        model=key,
        sizes=[list(size) for size in sizes],
        times_ms={step: [t * 1e3 for t in times[step]]
                  for step in steps},
        median_ms=medians,
        ratio=medians[1] / medians[0])


# ----------------------------------------------------------------------
# reporting
def find(rows: List[dict], model: str, size: Size) -> Optional[dict]:
    for row in rows:
        if row['model'] == model and tuple(row['size']) == tuple(size):
            return row
    return None


def ratio(rows: List[dict], field: str, num: Tuple[str, Size],
          den: Tuple[str, Size]) -> Optional[float]:
    """``field`` of row ``num`` over row ``den``, None when either is
    missing."""
    top, bottom = find(rows, *num), find(rows, *den)
    if top is None or bottom is None or not bottom[field]:
        return None
    return top[field] / bottom[field]


def with_footprint(rows: List[dict]) -> List[dict]:
    """Eval rows with ``footprint_mb``: peak plus the bias cache the model
    keeps between calls."""
    return [
        dict(row, footprint_mb=row['peak_mb'] + row['bias_cache_mb'])
        for row in rows
    ]


def scaling_ratio(scaling: Optional[dict]) -> Optional[float]:
    """The interleaved 2048² / 1024² ratio, None if not measured at
    those sizes."""
    wanted = [list(size) for size in TARGET_SCALING]
    if scaling is None or scaling['sizes'] != wanted:
        return None
    return scaling['ratio']


def target_ratios(eval_rows: List[dict], train_rows: List[dict],
                  scaling: Optional[dict]) -> Dict[str, Optional[float]]:
    """The ratios of :data:`TARGETS`, from rows of one run."""
    fast, ref = 'agent_pvt_t', 'agent_pvt_t_ref'
    s1024, s512 = (1024, 1024), (512, 512)
    return {
        'pvt_t_eval_time_fast_over_ref':
        ratio(eval_rows, 'median_ms', (fast, s1024), (ref, s1024)),
        'pvt_t_eval_mem_fast_over_ref':
        ratio(eval_rows, 'peak_mb', (fast, s1024), (ref, s1024)),
        'pvt_t_eval_footprint_fast_over_ref':
        ratio(
            with_footprint(eval_rows), 'footprint_mb', (fast, s1024),
            (ref, s1024)),
        'pvt_t_train_time_fast_over_ref':
        ratio(train_rows, 'median_ms', (fast, s512), (ref, s512)),
        'pvt_t_train_mem_fast_over_ref':
        ratio(train_rows, 'peak_mb', (fast, s512), (ref, s512)),
        'pvt_t_time_2048_over_1024':
        scaling_ratio(scaling),
        'pvt_s_time_agent_over_mmdet':
        ratio(eval_rows, 'median_ms', ('agent_pvt_s', s1024),
              ('pvt_s', s1024)),
    }


def flop_checks(eval_rows: List[dict], tolerance: float = 0.05) -> List[dict]:
    """Fast vs reference FLOPs outside attention and bias resizing, where
    the paths differ by design: the rest of the network must count the
    same (attention counting is covered by the unit tests)."""
    checks = []
    for row in eval_rows:
        twin = MODELS[row['model']].reference_of
        fast = find(eval_rows, twin, row['size']) if twin else None
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


def fmt(value: Optional[float], spec: str = '.2f') -> str:
    return 'n/a' if value is None else format(value, spec)


def size_text(size: Sequence[int]) -> str:
    return f'{size[0]}×{size[1]}'


def comparison(rows: List[dict],
               row: dict) -> Tuple[Optional[float], Optional[float]]:
    """Time of an agent (fast) model over its reference twin and over its
    mmdet baseline at the same size."""
    spec, size = MODELS[row['model']], row['size']
    reference = [
        k for k, s in MODELS.items() if s.reference_of == row['model']
    ]
    vs_ref = (
        ratio(rows, 'median_ms', (row['model'], size),
              (reference[0], size)) if reference else None)
    vs_base = (
        ratio(rows, 'median_ms', (row['model'], size),
              (spec.baseline, size)) if spec.baseline else None)
    return vs_ref, vs_base


def eval_table(rows: List[dict], params: Dict[str, int]) -> List[str]:
    lines = [
        '| Model | Input | Tokens | Params (M) | GFLOPs | Fwd ms (median) '
        '| Peak MB | Bias cache MB | × reference | × mmdet |',
        '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|'
    ]
    for row in rows:
        vs_ref, vs_base = comparison(rows, row)
        flops = row['flops']
        gflops = fmt(None if flops is None else flops / 1e9, '.1f')
        lines.append(
            f"| {MODELS[row['model']].label} | {size_text(row['size'])} "
            f"| {row['tokens']} | {params[row['model']] / 1e6:.2f} "
            f"| {gflops} | {row['median_ms']:.0f} "
            f"| {row['peak_mb']:.0f} | {row['bias_cache_mb']:.0f} "
            f'| {fmt(vs_ref)} | {fmt(vs_base)} |')
    return lines


def train_table(rows: List[dict]) -> List[str]:
    lines = [
        '| Model | Input | Batch | Fwd+bwd ms (median) | Peak MB '
        '| × reference | × mmdet |', '|---|---|---:|---:|---:|---:|---:|'
    ]
    for row in rows:
        vs_ref, vs_base = comparison(rows, row)
        lines.append(
            f"| {MODELS[row['model']].label} | {size_text(row['size'])} "
            f"| {row['batch']} | {row['median_ms']:.0f} "
            f"| {row['peak_mb']:.0f} | {fmt(vs_ref)} | {fmt(vs_base)} |")
    return lines


def ratio_lines(ratios: Dict[str, Optional[float]]) -> List[str]:
    lines = [
        '| Ratio (same run) | Value | Target | Met |', '|---|---:|---:|---|'
    ]
    for target in TARGETS:
        value = ratios[target.key]
        met = 'n/a' if value is None else (
            'yes' if value <= target.bound else 'NO')
        lines.append(f'| {target.description} | {fmt(value, ".3f")} '
                     f'| ≤ {target.bound} | {met} |')
    return lines


def scaling_lines(scaling: Optional[dict]) -> List[str]:
    if scaling is None:
        return []
    (first, second), sizes = scaling['median_ms'], scaling['sizes']
    return [
        '', '## Scaling (the two sizes alternating, call by call)', '',
        f"{MODELS[scaling['model']].label} forward: {first:.0f} ms at "
        f'{size_text(sizes[0])}, {second:.0f} ms at {size_text(sizes[1])}, '
        f"ratio {scaling['ratio']:.2f}"
    ]


def check_lines(results: dict) -> List[str]:
    lines = []
    for check in results['flop_checks']:
        lines.append(
            f"- FLOPs outside attention and resizing, "
            f"{MODELS[check['model']].label} "
            f"{size_text(check['size'])}: fast {check['fast_gflops']:.2f} G, "
            f"reference {check['reference_gflops']:.2f} G "
            f"({check['relative_difference']:+.2%}, "
            f"{'ok' if check['ok'] else 'OUTSIDE ±5%'})")
    for skip in results['skipped']:
        lines.append(f"- Skipped ({skip['mode']}, --max-tokens): "
                     f"{MODELS[skip['model']].label} at "
                     f"{size_text(skip['size'])}")
    for model, diff in results['output_max_abs_diff'].items():
        lines.append(f'- Outputs {MODELS[model].label} fast vs reference: '
                     f'max |Δ| = {diff:.2e}')
    return lines


def markdown(results: dict) -> str:
    meta = results['meta']
    lines = [
        '# Backbone benchmark', '',
        f"{meta['device']}, float32, {meta['threads']} threads, torch "
        f"{meta['torch']}, median of {meta['repeats']} interleaved calls, "
        f"each right after {meta['warmup']} untimed call(s) of the same "
        'model; load average '
        f"{meta['load_avg_start']:.1f} at start, {meta['load_avg_end']:.1f} "
        'at end.', f"Peak memory: {meta['memory_method']}",
        'FLOPs: mmengine FlopAnalyzer, one multiply-add = one flop, '
        'attention (SDPA/matmul) included.', '',
        f"## Inference (eval, no_grad, batch {meta['batch']})", ''
    ]
    lines += eval_table(results['eval'], results['params'])
    if results['train']:
        lines += [
            '', f"## Training (train mode, forward + backward, batch "
            f"{meta['train_batch']})", ''
        ]
        lines += train_table(results['train'])
    lines += scaling_lines(results.get('scaling'))
    lines += ['', '## Ratios', ''] + ratio_lines(results['ratios'])
    lines += ['', '## Checks', ''] + check_lines(results)
    return '\n'.join(lines) + '\n'


def plot_latency(rows: List[dict], path: str) -> None:
    """Log-log forward latency vs tokens, one line per model."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 5))
    for key in dict.fromkeys(row['model'] for row in rows):
        points = sorted(
            (r['tokens'], r['median_ms']) for r in rows if r['model'] == key)
        style = '--' if MODELS[key].reference_of else '-'
        ax.plot(*zip(*points), style, marker='o', label=MODELS[key].label)
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('tokens (H·W/16)')
    ax.set_ylabel('forward latency (ms, median)')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize='small')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save(results: dict, out_dir: str) -> None:
    with open(osp.join(out_dir, 'benchmark.json'), 'w') as f:
        json.dump(results, f, indent=1)


# ----------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the benchmark; returns the results also written to JSON."""
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    memory_method = (
        'torch.cuda.max_memory_allocated above the allocation before the '
        'call' if device.type == 'cuda' else
        'replay of torch.profiler CPU allocation/free events; tensor memory '
        'allocated during the call above what was live before it (weights, '
        'input and bias cache excluded)')
    results = dict(
        meta=dict(
            device=str(device),
            threads=torch.get_num_threads(),
            torch=torch.__version__,
            python=platform.python_version(),
            cpu_count=os.cpu_count(),
            batch=args.batch,
            train_batch=args.train_batch,
            repeats=args.repeats,
            warmup=args.warmup,
            memory_method=memory_method,
            load_avg_start=os.getloadavg()[0]),
        params={},
        eval=[],
        train=[],
        skipped=[],
        output_max_abs_diff={})
    log(f'building {len(args.models)} models on {device}, '
        f'{args.threads} threads')
    models = build_models(args.models, device)
    results['params'] = {
        key: sum(p.numel() for p in model.parameters())
        for key, model in models.items()
    }
    smallest = min(args.sizes, key=lambda s: s[0] * s[1])
    results['output_max_abs_diff'] = output_differences(
        models, torch.randn(1, 3, *smallest, device=device))
    limits = dict(args.max_tokens)
    for mode, sizes in (('eval', args.sizes), ('train', args.train_sizes)):
        batch = args.train_batch if mode == 'train' else args.batch
        for size in sizes:
            active = within_limits(models, size, limits)
            results['skipped'] += [
                dict(model=key, size=list(size), mode=mode) for key in models
                if key not in active
            ]
            results[mode] += measure(active, size, batch, mode == 'train',
                                     args, device)
            save(results, args.out_dir)
    largest = max(args.scaling_sizes, key=lambda s: s[0] * s[1], default=None)
    if largest and SCALING_MODEL in within_limits(models, largest, limits):
        results['scaling'] = measure_scaling(SCALING_MODEL,
                                             models[SCALING_MODEL],
                                             args.scaling_sizes, args, device)
        save(results, args.out_dir)
    results['meta']['load_avg_end'] = os.getloadavg()[0]
    results['ratios'] = target_ratios(results['eval'], results['train'],
                                      results.get('scaling'))
    results['flop_checks'] = flop_checks(results['eval'])
    save(results, args.out_dir)
    table = markdown(results)
    with open(osp.join(args.out_dir, 'benchmark.md'), 'w') as f:
        f.write(table)
    plot_latency(results['eval'],
                 osp.join(args.out_dir, 'latency_vs_tokens.png'))
    print(table)
    return results


if __name__ == '__main__':
    main()
