"""What the eval bias cache costs and saves over a sequence of input shapes.

A detection test pipeline (keep-ratio resize to 1333x800, padding to 32)
gives most images a shape of their own, so the cache's maps are seldom
reused; slide inference repeats one crop shape. Measured per variant of
Agent-PVT-T (fresh model, eval, no autograd):

- the first forward of a new shape: peak tensor memory of the call above
  what was live before it (maps the cache keeps are allocated in the call,
  so they are part of it), and the cache's memory after it;
- a COCO-like sequence of distinct keep-ratio shapes, each seen once:
  total time, the memory its calls faulted in (freed memory the C
  allocator returned to the kernel, :class:`~agent_mm.utils.timing.Call`),
  and the cache's memory after it;
- a shape seen twice before: time of a call that the cache serves.

The variants' calls are interleaved shape by shape, in an order that
rotates from shape to shape, so load from other processes hits all of
them. Before they are timed at a shape, a copy of
each (its bias cache empty) runs once at it: what the first call at a shape
prepares for the whole process (oneDNN's kernels for new bfloat16 product
shapes, the resizing weights cached per size) is then ready for all, and no
variant pays it for the others (in bfloat16 the variant timed first paid
about 0.1 s a shape). In a lower precision (autocast, the parameters
in float32) a fifth variant builds the maps where the others fold them
into the products (:mod:`agent_mm.models.folded_bias`).
"""
import copy
from functools import partial
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from agent_mm.models import AgentAttention
from agent_mm.models.layers import round_up
from agent_mm.utils.timing import (Call, eval_step, measured_call, peak_bytes,
                                   timed)
from .measure import MB, bias_cache_bytes, fault_mb, log
from .models import FLOAT32, MODELS, in_precision
from .report import fmt

# (width, height) of common COCO image sizes
COCO_IMAGE_SIZES = ((640, 480), (480, 640), (640, 427), (427, 640),
                    (640, 360), (612, 612), (640, 512), (640, 400))
# mmdet's test resize and padding
TEST_SCALE = (1333, 800)
PAD = 32

VARIANTS: Dict[str, Callable[[], nn.Module]] = {
    'fast (default: cached from a second sighting)':
    MODELS['agent_pvt_t'].build,
    'fast, cached at first sight':
    partial(MODELS['agent_pvt_t'].build, bias_cache_admit_after=1),
    'fast, cache off': MODELS['agent_pvt_t_nocache'].build,
    'reference (literal)': MODELS['agent_pvt_t_ref'].build,
}
MAPS_BUILT = 'fast, cache off, maps built (none folded)'


def build_maps_built() -> nn.Module:
    """Agent-PVT-T without cache whose attentions never fold their maps."""
    model = MODELS['agent_pvt_t_nocache'].build()
    for module in model.modules():
        if isinstance(module, AgentAttention):
            module.fold_biases = False
    return model


def variants(dtype: str) -> Dict[str, Callable[[], nn.Module]]:
    """:data:`VARIANTS`, and in a precision other than float32 (where maps
    may be folded) the :data:`MAPS_BUILT` one."""
    if dtype == FLOAT32:
        return dict(VARIANTS)
    return {**VARIANTS, MAPS_BUILT: build_maps_built}


def keep_ratio_shape(width: int, height: int) -> Tuple[int, int]:
    """``(H, W)`` of an image after mmdet's keep-ratio resize to
    :data:`TEST_SCALE` and padding to a multiple of :data:`PAD`."""
    long_edge, short_edge = max(TEST_SCALE), min(TEST_SCALE)
    scale = min(long_edge / max(width, height),
                short_edge / min(width, height))
    return tuple(
        round_up(round(side * scale), PAD) for side in (height, width))


def coco_like_shapes() -> List[Tuple[int, int]]:
    """The distinct padded shapes of :data:`COCO_IMAGE_SIZES`."""
    shapes = [keep_ratio_shape(w, h) for w, h in COCO_IMAGE_SIZES]
    return list(dict.fromkeys(shapes))


def measure_variants(first_size: int = 1024,
                     shapes: Sequence[Tuple[int, int]] = (),
                     seed: int = 0,
                     dtype: str = FLOAT32) -> Dict[str, dict]:
    """Measure every variant of :func:`variants`.

    Args:
        first_size: Side of the square input of the first forward.
        shapes: The sequence (default: :func:`coco_like_shapes`).
        seed: Seed of the weights (equal for all variants) and inputs.
        dtype: The precision, a key of :data:`~.models.DTYPES`.

    Returns:
        Per variant: ``first_peak_mb``, ``first_held_mb`` (cache after the
        first call), ``sequence_s``, ``sequence_fault_mb`` (None where
        faults are not counted), ``sequence_held_mb``, ``repeat_s``.
    """
    shapes = list(shapes) or coco_like_shapes()
    device = torch.device('cpu')
    models = {}
    for name, build in variants(dtype).items():
        torch.manual_seed(seed)
        models[name] = in_precision(build().eval(), dtype, device)
    results: Dict[str, dict] = {name: {} for name in models}
    sequence_calls: Dict[str, List[Call]] = {name: [] for name in models}
    first = torch.randn(1, 3, first_size, first_size)
    for name, model in models.items():
        log(f'first forward at {first_size}: {name}')
        peak = peak_bytes(eval_step(model, first), device)
        results[name]['first_peak_mb'] = peak / MB
        results[name]['first_held_mb'] = bias_cache_bytes(model) / MB
    for model in models.values():
        model.train().eval()  # a new sequence: the caches start empty
    # copies for the warm-up: their own bias caches, emptied at each shape
    warm_ups = [copy.deepcopy(model) for model in models.values()]
    names = list(models)
    for index, shape in enumerate(shapes):
        inputs = torch.randn(1, 3, *shape)
        log(f'sequence shape {shape[0]}x{shape[1]}')
        for model in warm_ups:
            eval_step(model, inputs)()
            model.train().eval()
        # the variants' order rotates from shape to shape, so that none is
        # always timed after the same one
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            sequence_calls[name].append(
                measured_call(eval_step(models[name], inputs), device))
    for name, model in models.items():
        calls = sequence_calls[name]
        results[name]['sequence_s'] = sum(call.seconds for call in calls)
        results[name]['sequence_fault_mb'] = fault_mb(calls, sum)
        results[name]['sequence_held_mb'] = bias_cache_bytes(model) / MB
        for _ in range(2):  # sightings: admitted at the second
            eval_step(model, first)()
        results[name]['repeat_s'] = timed(eval_step(model, first), device)
    return results


def report(results: Dict[str, dict],
           shapes: Sequence[Tuple[int, int]],
           first_size: int,
           dtype: str = FLOAT32) -> str:
    """A markdown table of :func:`measure_variants`' results, with the
    ratios to the reference."""
    reference = results['reference (literal)']
    lines = [
        f'{dtype}. First forward at {first_size}x{first_size}; sequence of '
        f'{len(shapes)} distinct shapes: '
        + ', '.join(f'{h}x{w}' for h, w in shapes) + '. MB: 2^20 bytes.',
        '',
        '| Variant | first forward peak (MB) | x reference | held after '
        'it (MB) | held after sequence (MB) | sequence time (s) | '
        f'x reference | faulted in over the sequence (MB) | repeat of '
        f'{first_size}² (ms) |', '|---|---|---|---|---|---|---|---|---|'
    ]
    for name, row in results.items():
        first = row['first_peak_mb']
        lines.append(
            f"| {name} | {first:.0f} | "
            f"{first / reference['first_peak_mb']:.2f} | "
            f"{row['first_held_mb']:.0f} | "
            f"{row['sequence_held_mb']:.0f} | {row['sequence_s']:.2f} | "
            f"{row['sequence_s'] / reference['sequence_s']:.2f} | "
            f"{fmt(row['sequence_fault_mb'], '.0f')} | "
            f"{1000 * row['repeat_s']:.0f} |")
    return '\n'.join(lines)
