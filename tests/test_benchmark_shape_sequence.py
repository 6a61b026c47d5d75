"""The bias cache over a sequence of shapes (agent_mm/benchmark/
shape_sequence.py)."""
import pytest

from agent_mm.benchmark import shape_sequence
from agent_mm.benchmark.shape_sequence import (MAPS_BUILT, PAD, TEST_SCALE,
                                               coco_like_shapes,
                                               keep_ratio_shape,
                                               measure_variants, report,
                                               variants)
from agent_mm.models import AgentAttention


@pytest.mark.parametrize('width, height, shape', [
    (640, 480, (800, 1088)),  # 1067 wide, padded to 1088
    (480, 640, (1088, 800)),  # the short side is what reaches 800
    (640, 360, (768, 1344)),  # the long side reaches 1333 first
])
def test_keep_ratio_shape_is_mmdet_resize_then_padding(width, height, shape):
    assert keep_ratio_shape(width, height) == shape


def test_coco_like_shapes_are_distinct_padded_test_shapes():
    shapes = coco_like_shapes()
    assert len(shapes) == len(set(shapes)) == 8
    for shape in shapes:
        assert all(side % PAD == 0 for side in shape)
        assert max(shape) <= -(-max(TEST_SCALE) // PAD) * PAD
        assert min(shape) <= -(-min(TEST_SCALE) // PAD) * PAD


def test_only_repeated_shapes_hold_maps():
    results = measure_variants(first_size=64, shapes=[(64, 96), (96, 64)])
    default = results['fast (default: cached from a second sighting)']
    eager = results['fast, cached at first sight']
    assert default['first_held_mb'] == default['sequence_held_mb'] == 0
    assert eager['first_held_mb'] > 0 and eager['sequence_held_mb'] > 0
    assert results['fast, cache off']['sequence_held_mb'] == 0
    # the maps kept at first sight are allocated in the first call
    assert eager['first_peak_mb'] > default['first_peak_mb']
    table = report(results, [(64, 96), (96, 64)], 64)
    assert table.count('\n| ') == 1 + len(results)  # header + one per row
    assert '64x96, 96x64' in table
    # what the sequence's calls faulted in, counted on Linux
    assert all(row['sequence_fault_mb'] >= 0 for row in results.values())
    assert 'faulted in over the sequence (MB)' in table


def test_a_lower_precision_adds_the_variant_with_maps_built():
    assert MAPS_BUILT not in variants('float32')
    results = measure_variants(first_size=64, shapes=[(64, 96)],
                               dtype='bfloat16')
    assert list(results) == list(variants('bfloat16'))
    assert MAPS_BUILT in results
    model = variants('bfloat16')[MAPS_BUILT]()
    attentions = [m for m in model.modules() if isinstance(m, AgentAttention)]
    assert attentions and not any(m.fold_biases for m in attentions)
    assert not any(m.bias_cache.max_shapes for m in attentions)
    table = report(results, [(64, 96)], 64, 'bfloat16')
    assert table.startswith('bfloat16.')
    assert table.count('\n| ') == 1 + len(results)


def test_the_variants_order_rotates_from_shape_to_shape(monkeypatch):
    timed = []

    def recorded(step, device):
        timed.append(step)
        return shape_sequence.Call(0.1, 0)

    monkeypatch.setattr(shape_sequence, 'measured_call', recorded)
    monkeypatch.setattr(shape_sequence, 'eval_step',
                        lambda model, inputs: lambda: (model, inputs.shape))
    shapes = [(64, 96), (96, 64), (64, 64)]
    measure_variants(first_size=64, shapes=shapes)
    count = len(variants('float32'))
    sequence = [step() for step in timed[:count * len(shapes)]]
    firsts = [sequence[i * count][0] for i in range(len(shapes))]
    assert len(set(map(id, firsts))) == len(shapes)
    for i, shape in enumerate(shapes):  # every variant once at each shape
        at_shape = sequence[i * count:(i + 1) * count]
        assert all(s[1][2:] == shape for s in at_shape)
        assert len(set(id(s[0]) for s in at_shape)) == count
