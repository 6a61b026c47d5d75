"""The eval-time cache of agent attention's bias maps."""
import threading
from collections import OrderedDict
from typing import Callable, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor

from .layers import plain_tensors

Maps = Tuple[Tensor, ...]
Shape = Tuple[int, int]

# a shape's maps are stored from its second sighting on
ADMIT_AFTER = 2
# shapes seen but not yet admitted that are remembered (shapes only)
SIGHTINGS_KEPT = 64


class CacheBudget:
    """The bytes that the bias caches sharing it may hold together (a
    backbone's ``bias_cache_max_mb``).

    Thread-safe; a copy (``deepcopy`` or pickle of a model, which copies
    the caches sharing it together) starts with nothing held.

    Args:
        max_bytes: The bound; None for none.
    """

    def __init__(self, max_bytes: Optional[int] = None):
        self.max_bytes = max_bytes
        self._held = 0
        self._lock = threading.Lock()

    @classmethod
    def of_mb(cls, max_mb: Optional[float]) -> 'CacheBudget':
        """A budget of ``max_mb`` MiB (None: unbounded)."""
        return cls(None if max_mb is None else int(max_mb * 2**20))

    def __getstate__(self) -> dict:
        return dict(max_bytes=self.max_bytes)

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    @property
    def held(self) -> int:
        """The bytes held by the caches sharing the budget."""
        with self._lock:
            return self._held

    def reserve(self, nbytes: int) -> bool:
        """Hold ``nbytes`` more if the bound allows it; whether it did."""
        with self._lock:
            if (self.max_bytes is not None
                    and self._held + nbytes > self.max_bytes):
                return False
            self._held += nbytes
            return True

    def release(self, nbytes: int) -> None:
        """Hold ``nbytes`` fewer."""
        with self._lock:
            self._held -= nbytes


class BiasCache:
    """Bias maps of the most recently used input shapes that repeat.

    Agent attention's bias maps depend only on the token grid and on the
    bias parameters, so in inference they can be built once per grid. The
    maps are large (``heads * n * H * W`` values each), so only the
    ``max_shapes`` most recently used grids are kept, and the entries are
    valid only for the version and the values of the sources they were
    built from. The version (storage, in-place version counters, device,
    precision) changes with an optimizer step, ``load_state_dict``, a move
    to another device or dtype, or a forward under autocast to another
    precision; the values are compared too (a few small tensors), as writes
    through ``.data`` (mmengine's EMA, weight swaps) leave the version
    counters as they were. Either change drops every entry. On a GPU the
    comparison waits for the device, once per call.

    A grid is admitted only at its ``admit_after``-th sighting: before, its
    maps are built and returned but not kept, so a grid that never repeats
    (keep-ratio resizing in a detection test pipeline) costs what the
    uncached path costs. Sightings are counted per version and values, for
    the :data:`SIGHTINGS_KEPT` most recently seen grids not yet admitted; a
    grid dropped from the cache must be seen ``admit_after`` times again.

    The memory is bounded by a :class:`CacheBudget` that caches may share
    (all those of a backbone): an admitted grid whose maps do not fit in
    what the budget has left is not kept, and is not admitted again until
    the cache is cleared (``train()``, new parameter values), so that a
    large model holds the maps of its first blocks rather than thrashing.

    Threads may share the cache (concurrent inference with one model): its
    records change under a lock, and maps are built outside it. A pickled
    or deep-copied cache (``torch.save`` of a model, an EMA copy) starts
    empty.

    Args:
        max_shapes: Grids kept at most; 0 disables the cache.
        admit_after: Sighting of a grid from which its maps are kept; 1
            keeps them at once.
        budget: The bytes this cache may hold, shared with other caches;
            None for an unbounded budget of its own.
    """

    def __init__(self,
                 max_shapes: int,
                 admit_after: int = ADMIT_AFTER,
                 budget: Optional[CacheBudget] = None):
        self.max_shapes = max_shapes
        self.admit_after = admit_after
        self.budget = budget or CacheBudget()
        self._lock = threading.Lock()
        self._entries: 'OrderedDict[Shape, Maps]' = OrderedDict()
        self._sightings: 'OrderedDict[Shape, int]' = OrderedDict()
        # grids admitted whose maps did not fit in the budget
        self._too_large: Set[Shape] = set()
        # what the entries and sightings were built from, and how often
        # that changed
        self._version: Optional[tuple] = None
        self._sources: Tuple[Tensor, ...] = ()
        self._generation = 0

    def __getstate__(self) -> dict:
        return dict(
            max_shapes=self.max_shapes,
            admit_after=self.admit_after,
            budget=self.budget)

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def get(self,
            shape: Shape,
            version: tuple,
            compute: Callable[[], Maps],
            compute_for_once: Callable[[], Maps],
            sources: Sequence[Tensor]) -> Maps:
        """The maps of ``shape`` built from ``sources`` (small tensors, whose
        values are compared at every call, as ``.data`` writes leave
        ``version`` unchanged) at ``version``: cached, or computed by
        ``compute`` (and cached if the shape is admitted). Maps that are not
        cached are computed by ``compute_for_once`` (it may return memory
        that the caller reuses after this use)."""
        if not self.max_shapes:
            return compute_for_once()
        shape = tuple(shape)
        with self._lock:
            self._forget_unless_built_from(version, sources)
            maps = self._entries.get(shape)
            if maps is not None:
                self._entries.move_to_end(shape)
                return maps
            admitted = shape not in self._too_large and self._admits(shape)
            generation = self._generation
        if not admitted:
            return compute_for_once()
        with plain_tensors():  # kept: usable by later forwards with autograd
            maps = compute()
        with self._lock:
            if self._generation == generation:  # not dropped meanwhile
                self._store(shape, maps)
        return maps

    def _store(self, shape: Shape, maps: Maps) -> None:
        """Keep ``maps`` as the most recently used entry if the budget has
        room for them once the least recently used entries beyond
        ``max_shapes - 1`` are dropped (the lock held)."""
        self._drop(shape)  # stored meanwhile by another thread
        while len(self._entries) >= self.max_shapes:
            self._drop(next(iter(self._entries)))
        if self.budget.reserve(_nbytes(maps)):
            self._entries[shape] = maps
        else:
            self._too_large.add(shape)

    def _drop(self, shape: Shape) -> None:
        """Forget the entry of ``shape``, if any (the lock held)."""
        maps = self._entries.pop(shape, None)
        if maps is not None:
            self.budget.release(_nbytes(maps))

    def _forget_unless_built_from(self, version: tuple,
                                  sources: Sequence[Tensor]) -> None:
        """Drop every entry and sighting unless they were built from
        ``sources`` with these values at ``version``, and record those."""
        if version == self._version and _equal(sources, self._sources):
            return
        self._forget()
        with plain_tensors():
            self._sources = tuple(
                source.detach().clone() for source in sources)
        self._version = version

    def _admits(self, shape: Shape) -> bool:
        """Count a sighting of ``shape``, not cached: whether its maps are
        to be kept now."""
        seen = self._sightings.pop(shape, 0) + 1
        if seen >= self.admit_after:
            return True
        self._sightings[shape] = seen
        if len(self._sightings) > SIGHTINGS_KEPT:
            self._sightings.popitem(last=False)
        return False

    def maps(self, shape: Shape) -> Optional[Maps]:
        """The cached maps of ``shape``, or None."""
        with self._lock:
            return self._entries.get(tuple(shape))

    @property
    def shapes(self) -> List[Shape]:
        """The cached grids, least recently used first."""
        with self._lock:
            return list(self._entries)

    @property
    def pending_shapes(self) -> List[Shape]:
        """The grids seen but not yet admitted, least recently seen
        first."""
        with self._lock:
            return list(self._sightings)

    @property
    def nbytes(self) -> int:
        """Memory held by the cached maps."""
        with self._lock:
            return sum(_nbytes(maps) for maps in self._entries.values())

    def clear(self) -> None:
        """Drop every cached map and every sighting."""
        with self._lock:
            self._forget()
            self._version, self._sources = None, ()

    def _forget(self) -> None:
        """Drop every entry and sighting (the lock held)."""
        for shape in list(self._entries):
            self._drop(shape)
        self._sightings.clear()
        self._too_large.clear()
        self._generation += 1

    def __len__(self) -> int:
        return len(self._entries)


def _equal(tensors: Sequence[Tensor], others: Sequence[Tensor]) -> bool:
    """Whether both sequences hold tensors of equal shapes and values, in
    the same order."""
    return len(tensors) == len(others) and all(
        torch.equal(a, b) for a, b in zip(tensors, others))


def _nbytes(maps: Maps) -> int:
    """Memory of the tensors of ``maps``."""
    return sum(t.numel() * t.element_size() for t in maps)
