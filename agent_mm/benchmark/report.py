"""The outputs of a run: markdown tables, JSON and the latency plot.

Everything here reads the results dict of :func:`agent_mm.benchmark.run.run`
(as saved to ``benchmark.json``) and measures nothing.
"""
import json
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple

from .measure import MATMUL_SIZE
from .models import FLOAT32, MODELS, reference_twin, size_text
from .targets import TARGETS, Rows, ratio, roofline_share, rows_in

# the short names of the precisions, in ratio headings and plot labels
SHORT_DTYPES = {FLOAT32: 'fp32', 'bfloat16': 'bf16', 'float16': 'fp16'}


def fmt(value: Optional[float], spec: str = '.2f') -> str:
    """``value`` formatted with ``spec``, ``'n/a'`` for None."""
    return 'n/a' if value is None else format(value, spec)


def time_over(rows: Rows, row: dict, other: Optional[str]) -> Optional[float]:
    """Median time of ``row`` over that of model ``other`` at its size."""
    if other is None:
        return None
    return ratio(rows, 'median_ms', (row['model'], row['size']),
                 (other, row['size']))


def fault_cell(row: dict) -> str:
    """A row's faulted-in memory in MB (``'n/a'`` where not counted, as in
    the results of runs before it was)."""
    return fmt(row.get('fault_mb'), '.0f')


def comparison(rows: Rows,
               row: dict) -> Tuple[Optional[float], Optional[float]]:
    """Time of an agent (fast) model's row over its reference twin's and
    over its mmdet baseline's at the same size and precision (None where
    there is none).
    """
    rows = rows_in(rows, row['dtype'])
    return (time_over(rows, row, reference_twin(row['model'])),
            time_over(rows, row, MODELS[row['model']].baseline))


def eval_table(rows: Rows, params: Dict[str, int]) -> List[str]:
    """The inference table, one line per eval row."""
    lines = [
        '| Model | Input | Dtype | Tokens | Params (M) | GFLOPs '
        '| Fwd ms (median) | Roofline % | Faults MB | Peak MB '
        '| Bias cache MB | × reference | × mmdet |',
        '|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|'
    ]
    for row in rows:
        vs_ref, vs_base = comparison(rows, row)
        flops = row['flops']
        gflops = fmt(None if flops is None else flops / 1e9, '.1f')
        share = roofline_share(row)
        lines.append(
            f"| {MODELS[row['model']].label} | {size_text(row['size'])} "
            f"| {row['dtype']} | {row['tokens']} "
            f"| {params[row['model']] / 1e6:.2f} "
            f"| {gflops} | {row['median_ms']:.0f} "
            f"| {fmt(None if share is None else share * 100, '.0f')} "
            f"| {fault_cell(row)} "
            f"| {row['peak_mb']:.0f} | {row['bias_cache_mb']:.0f} "
            f'| {fmt(vs_ref)} | {fmt(vs_base)} |')
    return lines


def train_table(rows: Rows) -> List[str]:
    """The training table, one line per train row."""
    lines = [
        '| Model | Input | Dtype | Batch | Fwd+bwd ms (median) | Faults MB '
        '| Peak MB | × reference | × mmdet |',
        '|---|---|---|---:|---:|---:|---:|---:|---:|'
    ]
    for row in rows:
        vs_ref, vs_base = comparison(rows, row)
        lines.append(
            f"| {MODELS[row['model']].label} | {size_text(row['size'])} "
            f"| {row['dtype']} | {row['batch']} | {row['median_ms']:.0f} "
            f"| {fault_cell(row)} | {row['peak_mb']:.0f} | {fmt(vs_ref)} "
            f"| {fmt(vs_base)} |")
    return lines


def precision_lines(entries: List[dict]) -> List[str]:
    """A section per lower precision run beside float32: its time over
    float32's for each model, size and mode (none without such entries).

    Args:
        entries: The results' ``precision_ratios``.
    """
    lines = []
    base = SHORT_DTYPES[FLOAT32]
    for dtype in dict.fromkeys(entry['dtype'] for entry in entries):
        low = SHORT_DTYPES[dtype]
        lines += [
            '', f'## {low} / {base} time (same model, input and mode)', '',
            f'| Mode | Model | Input | {base} ms (median) '
            f'| {low} ms (median) | {low} / {base} |',
            '|---|---|---|---:|---:|---:|'
        ]
        lines += [
            f"| {e['mode']} | {MODELS[e['model']].label} "
            f"| {size_text(e['size'])} | {e['float32_ms']:.0f} "
            f"| {e['median_ms']:.0f} | {e['ratio']:.2f} |" for e in entries
            if e['dtype'] == dtype
        ]
    return lines


def ratio_lines(ratios: Dict[str, Optional[float]]) -> List[str]:
    """The ratios table: every target's value, bound and whether it is met.
    """
    lines = [
        '| Ratio (same run) | Value | Target | Met |', '|---|---:|---:|---|'
    ]
    for target in TARGETS:
        value = ratios[target.key]
        met = 'n/a' if value is None else (
            'yes' if target.met(value) else 'NO')
        lines.append(f'| {target.description} | {fmt(value, ".3f")} '
                     f'| {target.bound_text()} | {met} |')
    return lines


def scaling_lines(scaling: Optional[dict]) -> List[str]:
    """The scaling section (none when the pair was not timed)."""
    if scaling is None:
        return []
    (first, second), sizes = scaling['median_ms'], scaling['sizes']
    label = MODELS[scaling['model']].label
    if scaling['dtype'] != FLOAT32:
        label += f" ({scaling['dtype']})"
    return [
        '', '## Scaling (the two sizes alternating, call by call)', '',
        f"{label} forward: {first:.0f} ms at "
        f'{size_text(sizes[0])}, {second:.0f} ms at {size_text(sizes[1])}, '
        f"ratio {scaling['ratio']:.2f}"
    ]


def check_lines(results: dict) -> List[str]:
    """The checks: FLOPs of the two paths, skipped models, output
    differences."""
    lines = []
    for check in results['flop_checks']:
        lines.append(
            f"- Same network (FLOPs outside attention and resizing), "
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


def span(values: Sequence[float]) -> str:
    """``'low–high'`` of ``values``, rounded; one number if they round
    alike."""
    low, high = f'{min(values):.0f}', f'{max(values):.0f}'
    return low if low == high else f'{low}–{high}'


def roofline_lines(rows: Rows, matmul_size: int) -> List[str]:
    """What the eval table's roofline column is, with the rates of the
    ``matmul_size``³ product the run measured in each precision (none for
    results without them)."""
    rates: Dict[str, List[float]] = {}
    for row in rows:
        if row.get('matmul_gflops'):
            rates.setdefault(row['dtype'], []).append(row['matmul_gflops'])
    if not rates:
        return []
    ranges = ', '.join(f'{dtype} {span(values)}'
                       for dtype, values in rates.items())
    return [
        f'Roofline %: the GEMM roofline (the FLOPs at the rate of a '
        f'{matmul_size}³ torch.mm in the row\'s precision, timed in the same '
        f'rounds as the models) over the forward time; that rate, GFLOP/s: '
        f'{ranges}.'
    ]


def precision_text(dtypes: Sequence[str]) -> str:
    """The precisions of a run, e.g. ``'float32 + bfloat16 (bfloat16 under
    torch.autocast, float32 parameters)'``."""
    text = ' + '.join(dtypes)
    lower = [dtype for dtype in dtypes if dtype != FLOAT32]
    if lower:
        text += (f" ({' and '.join(lower)} under torch.autocast, float32 "
                 'parameters)')
    return text


# said of a run without untimed calls
COLD_CALLS = (' (so the first timed calls of a fast model also build its '
              'bias maps, which its cache keeps from the second forward of '
              'a shape on)')


def header_lines(meta: dict) -> List[str]:
    """Title and how the run measured (from the results' ``meta``)."""
    return [
        '# Backbone benchmark', '',
        f"{meta['device']}, {precision_text(meta['dtypes'])}, "
        f"{meta['threads']} threads, torch "
        f"{meta['torch']}, median of {meta['repeats']} interleaved calls, "
        + ('after an untimed round of every model, '
           if meta.get('untimed_round') else '') +
        f"each right after {meta['warmup']} untimed call(s) of the same "
        'model' + ('' if meta['warmup'] else COLD_CALLS) + '; load average '
        f"{meta['load_avg_start']:.1f} at start, {meta['load_avg_end']:.1f} "
        'at end.', f"Peak memory: {meta['memory_method']}",
        'Faults: memory the kernel mapped into the process during a timed '
        'call (minor page faults × page size, median), i.e. freed memory '
        'that the C allocator returned to the kernel and that faults in '
        'again; its system time is part of the call.',
        'FLOPs: mmengine FlopAnalyzer, one multiply-add = one flop, '
        'attention (SDPA/matmul) included.',
        'MB: 2^20 bytes (MiB).'
    ]


def markdown(results: dict) -> str:
    """The whole report (``benchmark.md``) of a run's results."""
    meta = results['meta']
    # results of runs before --matmul-size timed the default product
    rates = roofline_lines(results['eval'],
                           meta.get('matmul_size', MATMUL_SIZE))
    lines = header_lines(meta) + rates + [
        '', f"## Inference (eval, no_grad, batch {meta['batch']})", ''
    ]
    lines += eval_table(results['eval'], results['params'])
    if results['train']:
        lines += [
            '', f"## Training (train mode, forward + backward, batch "
            f"{meta['train_batch']})", ''
        ]
        lines += train_table(results['train'])
    lines += precision_lines(results['precision_ratios'])
    lines += scaling_lines(results.get('scaling'))
    lines += ['', '## Ratios', '']
    if len(meta['dtypes']) > 1:
        lines += [
            f"Models compared from the {meta['dtypes'][0]} rows; bfloat16 / "
            'float32 from both.', ''
        ]
    lines += ratio_lines(results['ratios'])
    lines += ['', '## Checks', ''] + check_lines(results)
    return '\n'.join(lines) + '\n'


def plot_latency(rows: Rows, path: str) -> None:
    """Plot forward latency against tokens, log-log, one line per model and
    precision.

    Args:
        rows: Eval rows.
        path: The image file to write.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 5))
    for key, dtype in dict.fromkeys((row['model'], row['dtype'])
                                    for row in rows):
        points = sorted((r['tokens'], r['median_ms'])
                        for r in rows_in(rows, dtype) if r['model'] == key)
        style = '--' if MODELS[key].reference_of else '-'
        label = MODELS[key].label
        if dtype != FLOAT32:
            label += f' [{SHORT_DTYPES[dtype]}]'
        ax.plot(
            *zip(*points),
            style,
            marker='o' if dtype == FLOAT32 else 's',
            label=label)
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('tokens (H·W/16)')
    ax.set_ylabel('forward latency (ms, median)')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize='small')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_json(results: dict, out_dir: str) -> None:
    """Write ``benchmark.json`` (also called mid-run, after each size)."""
    with open(osp.join(out_dir, 'benchmark.json'), 'w') as f:
        json.dump(results, f, indent=1)


def write_report(results: dict, out_dir: str) -> str:
    """Write ``benchmark.json``, ``benchmark.md`` and
    ``latency_vs_tokens.png`` of a finished run.

    Args:
        results: The results of the run.
        out_dir: An existing directory.

    Returns:
        The markdown report.
    """
    save_json(results, out_dir)
    table = markdown(results)
    with open(osp.join(out_dir, 'benchmark.md'), 'w') as f:
        f.write(table)
    plot_latency(results['eval'],
                 osp.join(out_dir, 'latency_vs_tokens.png'))
    return table
