"""BiasCache: the most recently used shapes, one parameter version."""
import pytest
import torch

from agent_mm.models.bias_cache import BiasCache


class _Builder:
    """Builds a distinct pair of maps per call and counts the calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, size=4):
        self.calls += 1
        return torch.full((size, ), float(self.calls)), torch.zeros(2, 3)


def test_maps_are_built_once_per_shape_and_version():
    cache, build = BiasCache(2), _Builder()
    first = cache.get((8, 8), 'v1', build)
    assert cache.get((8, 8), 'v1', build) is first
    assert build.calls == 1
    assert cache.maps((8, 8)) is first


def test_only_the_most_recently_used_shapes_are_kept():
    cache, build = BiasCache(2), _Builder()
    for shape in [(8, 8), (6, 10), (8, 8), (5, 7)]:
        cache.get(shape, 'v1', build)
    assert cache.shapes == [(8, 8), (5, 7)]
    assert cache.maps((6, 10)) is None
    assert build.calls == 3


def test_another_parameter_version_drops_the_older_entries():
    cache, build = BiasCache(3), _Builder()
    cache.get((8, 8), 'v1', build)
    cache.get((6, 10), 'v1', build)
    updated = cache.get((8, 8), 'v2', build)
    assert cache.shapes == [(8, 8)]
    assert cache.maps((8, 8)) is updated
    assert build.calls == 3


def test_size_zero_caches_nothing():
    cache, build = BiasCache(0), _Builder()
    cache.get((8, 8), 'v1', build)
    cache.get((8, 8), 'v1', build)
    assert build.calls == 2
    assert not cache and cache.nbytes == 0


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_nbytes_counts_every_cached_map(dtype):
    cache = BiasCache(2)
    cache.get((2, 2), 'v', lambda: (torch.zeros(10, dtype=dtype),
                                    torch.zeros(3, 5, dtype=dtype)))
    cache.get((3, 3), 'v', lambda: (torch.zeros(7, dtype=dtype), ))
    size = torch.zeros((), dtype=dtype).element_size()
    assert cache.nbytes == (10 + 15 + 7) * size
    cache.clear()
    assert cache.nbytes == 0 and cache.shapes == []
