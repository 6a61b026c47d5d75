"""BiasCache: the most recently used shapes, one parameter version and its
values, stored from a shape's admit_after-th sighting on, shared by
threads, copied empty."""
import copy
import pickle

import pytest
import torch

from agent_mm.models.bias_cache import SIGHTINGS_KEPT, BiasCache, CacheBudget


def _get(cache, shape, version, build, sources=()):
    """``cache.get`` with ``build`` computing the maps, cached or not."""
    return cache.get(shape, version, build, build, sources)


class _Builder:
    """Builds a distinct pair of maps per call and counts the calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, size=4):
        self.calls += 1
        return torch.full((size, ), float(self.calls)), torch.zeros(2, 3)


def test_maps_are_built_once_per_shape_and_version():
    cache, build = BiasCache(2, admit_after=1), _Builder()
    first = _get(cache, (8, 8), 'v1', build)
    assert _get(cache, (8, 8), 'v1', build) is first
    assert build.calls == 1
    assert cache.maps((8, 8)) is first


def test_only_the_most_recently_used_shapes_are_kept():
    cache, build = BiasCache(2, admit_after=1), _Builder()
    for shape in [(8, 8), (6, 10), (8, 8), (5, 7)]:
        _get(cache, shape, 'v1', build)
    assert cache.shapes == [(8, 8), (5, 7)]
    assert cache.maps((6, 10)) is None
    assert build.calls == 3


def test_another_parameter_version_drops_the_older_entries():
    cache, build = BiasCache(3, admit_after=1), _Builder()
    _get(cache, (8, 8), 'v1', build)
    _get(cache, (6, 10), 'v1', build)
    updated = _get(cache, (8, 8), 'v2', build)
    assert cache.shapes == [(8, 8)]
    assert cache.maps((8, 8)) is updated
    assert build.calls == 3


def test_other_source_values_drop_the_entries_at_the_same_version():
    cache, build = BiasCache(3, admit_after=1), _Builder()
    source = torch.zeros(5)
    _get(cache, (8, 8), 'v1', build, sources=[source])
    _get(cache, (6, 10), 'v1', build, sources=[source])
    assert _get(cache, (8, 8), 'v1', build, sources=[source.clone()]) is \
        cache.maps((8, 8))  # equal values: a hit
    source.data.add_(1.)  # as mmengine's EMA writes: no version change
    updated = _get(cache, (8, 8), 'v1', build, sources=[source])
    assert cache.shapes == [(8, 8)] and cache.maps((8, 8)) is updated
    assert build.calls == 3
    assert _get(cache, (8, 8), 'v1', build, sources=[source]) is updated


def test_sightings_of_other_source_values_do_not_count():
    cache, build = BiasCache(2), _Builder()
    _get(cache, (8, 8), 'v1', build, sources=[torch.zeros(3)])
    _get(cache, (8, 8), 'v1', build, sources=[torch.ones(3)])
    assert not cache and cache.pending_shapes == [(8, 8)]


def _maps_of(nbytes):
    """A builder of one float32 map of ``nbytes`` bytes."""
    return lambda: (torch.zeros(nbytes // 4), )


def test_caches_sharing_a_budget_hold_at_most_its_bytes():
    budget = CacheBudget(max_bytes=1000)
    first, second = (BiasCache(2, admit_after=1, budget=budget)
                     for _ in range(2))
    _get(first, (8, 8), 'v1', _maps_of(600))
    assert budget.held == 600
    # does not fit beside the first cache's maps: built, returned, not kept
    maps = _get(second, (8, 8), 'v1', _maps_of(600))
    assert maps[0].numel() == 150 and not second and budget.held == 600
    _get(second, (4, 4), 'v1', _maps_of(400))
    assert second.shapes == [(4, 4)] and budget.held == 1000


def test_a_shape_too_large_for_the_budget_is_not_admitted_again():
    cache, build = BiasCache(2, budget=CacheBudget(max_bytes=8)), _Builder()
    for _ in range(4):  # admitted at the second sighting, then never
        _get(cache, (8, 8), 'v1', build)
    assert not cache and build.calls == 4 and cache.pending_shapes == []
    cache.clear()  # as train() does: admitted again
    for _ in range(2):
        _get(cache, (8, 8), 'v1', lambda: (torch.zeros(2), ))
    assert cache.shapes == [(8, 8)]


def test_dropped_maps_give_their_bytes_back_to_the_budget():
    budget = CacheBudget(max_bytes=10_000)
    cache = BiasCache(2, admit_after=1, budget=budget)
    for shape in [(8, 8), (6, 10), (5, 7)]:  # the first one evicted
        _get(cache, shape, 'v1', _maps_of(400))
    assert budget.held == 800 == cache.nbytes
    _get(cache, (8, 8), 'v2', _maps_of(400))  # another version
    assert budget.held == 400 == cache.nbytes
    cache.clear()
    assert budget.held == 0


def test_copies_of_caches_share_a_copy_of_their_budget_holding_nothing():
    budget = CacheBudget(max_bytes=1000)
    caches = [BiasCache(2, admit_after=1, budget=budget) for _ in range(2)]
    _get(caches[0], (8, 8), 'v1', _maps_of(600))
    copies = copy.deepcopy(caches)
    assert copies[0].budget is copies[1].budget is not budget
    assert copies[0].budget.max_bytes == 1000
    assert copies[0].budget.held == 0 and budget.held == 600
    _get(copies[1], (8, 8), 'v1', _maps_of(600))
    assert copies[1].shapes == [(8, 8)]


def test_budget_in_mib():
    assert CacheBudget.of_mb(1.5).max_bytes == 3 * 2**19
    assert CacheBudget.of_mb(None).max_bytes is None


def test_size_zero_caches_nothing():
    cache, build = BiasCache(0), _Builder()
    _get(cache, (8, 8), 'v1', build)
    _get(cache, (8, 8), 'v1', build)
    assert build.calls == 2
    assert not cache and cache.nbytes == 0 and cache.pending_shapes == []


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_nbytes_counts_every_cached_map(dtype):
    cache = BiasCache(2, admit_after=1)
    _get(cache, (2, 2), 'v', lambda: (torch.zeros(10, dtype=dtype),
                                      torch.zeros(3, 5, dtype=dtype)))
    _get(cache, (3, 3), 'v', lambda: (torch.zeros(7, dtype=dtype), ))
    size = torch.zeros((), dtype=dtype).element_size()
    assert cache.nbytes == (10 + 15 + 7) * size
    cache.clear()
    assert cache.nbytes == 0 and cache.shapes == []


def test_a_shape_seen_once_is_returned_but_not_stored():
    cache, build = BiasCache(2), _Builder()
    maps = _get(cache, (8, 8), 'v1', build)
    assert torch.equal(maps[0], torch.full((4, ), 1.))
    assert maps[1].shape == (2, 3)
    assert cache.maps((8, 8)) is None
    assert not cache and cache.nbytes == 0
    assert cache.pending_shapes == [(8, 8)]


def test_the_second_sighting_stores_and_the_third_hits():
    cache, build = BiasCache(2), _Builder()
    _get(cache, (8, 8), 'v1', build)
    second = _get(cache, (8, 8), 'v1', build)
    assert cache.maps((8, 8)) is second and cache.shapes == [(8, 8)]
    assert cache.nbytes > 0 and cache.pending_shapes == []
    assert _get(cache, (8, 8), 'v1', build) is second
    assert build.calls == 2


def test_admit_after_one_stores_at_the_first_sighting():
    cache, build = BiasCache(2, admit_after=1), _Builder()
    first = _get(cache, (8, 8), 'v1', build)
    assert cache.maps((8, 8)) is first and cache.pending_shapes == []


def test_admit_after_three_stores_at_the_third_sighting():
    cache, build = BiasCache(2, admit_after=3), _Builder()
    for _ in range(2):
        _get(cache, (8, 8), 'v1', build)
        assert not cache
    third = _get(cache, (8, 8), 'v1', build)
    assert cache.maps((8, 8)) is third and build.calls == 3


def test_shapes_that_never_repeat_leave_the_cache_empty():
    cache, build = BiasCache(2), _Builder()
    shapes = [(8 + i, 8) for i in range(8)]
    for shape in shapes:
        _get(cache, shape, 'v1', build)
    assert not cache and cache.nbytes == 0 and build.calls == 8
    assert cache.pending_shapes == shapes


def test_sightings_under_another_parameter_version_do_not_count():
    cache, build = BiasCache(2), _Builder()
    _get(cache, (8, 8), 'v1', build)
    _get(cache, (6, 10), 'v1', build)
    _get(cache, (8, 8), 'v2', build)
    assert not cache and cache.pending_shapes == [(8, 8)]
    updated = _get(cache, (8, 8), 'v2', build)
    assert cache.maps((8, 8)) is updated
    _get(cache, (6, 10), 'v2', build)
    assert cache.shapes == [(8, 8)]


def test_the_sighting_record_keeps_the_most_recent_shapes_only():
    cache, build = BiasCache(2), _Builder()
    shapes = [(1 + i, 1) for i in range(SIGHTINGS_KEPT + 1)]
    for shape in shapes:
        _get(cache, shape, 'v1', build)
    assert cache.pending_shapes == shapes[1:]
    _get(cache, shapes[0], 'v1', build)  # forgotten: a first sighting again
    _get(cache, shapes[2], 'v1', build)  # remembered: admitted
    assert cache.shapes == [shapes[2]]
    assert cache.pending_shapes == shapes[3:] + shapes[:1]


def test_clear_forgets_the_sightings():
    cache, build = BiasCache(2), _Builder()
    _get(cache, (8, 8), 'v1', build)
    cache.clear()
    _get(cache, (8, 8), 'v1', build)
    assert not cache and cache.pending_shapes == [(8, 8)]


def test_threads_sharing_the_cache_get_their_own_shapes_maps(run_in_threads):
    cache = BiasCache(2, admit_after=1)
    shapes = [(4 + i, 5) for i in range(6)]

    def build(shape):
        return lambda: (torch.full((1, ), float(shape[0])), )

    def work(seed):
        for step in range(2000):
            shape = shapes[(seed * 7 + step * 5) % len(shapes)]
            maps = _get(cache, shape, 'v1', build(shape))
            assert float(maps[0]) == shape[0], shape

    assert run_in_threads(work, 8) == []
    assert len(cache) <= 2


@pytest.mark.parametrize('copy_fn', [
    copy.deepcopy, lambda cache: pickle.loads(pickle.dumps(cache))
])
def test_a_copy_keeps_the_settings_and_starts_empty(copy_fn):
    cache, build = BiasCache(3, admit_after=2), _Builder()
    for _ in range(2):
        _get(cache, (8, 8), 'v1', build)
    _get(cache, (6, 10), 'v1', build)
    copied = copy_fn(cache)
    assert (copied.max_shapes, copied.admit_after) == (3, 2)
    assert not copied and copied.pending_shapes == []
    assert cache.shapes == [(8, 8)] and cache.pending_shapes == [(6, 10)]
    for _ in range(2):
        second = _get(copied, (8, 8), 'v1', build)
    assert copied.maps((8, 8)) is second
