"""The eval-time cache of agent attention's bias maps."""
import threading
from collections import OrderedDict
from typing import Callable, List, Optional, Tuple

from torch import Tensor

from .layers import plain_tensors

Maps = Tuple[Tensor, ...]

# a shape's maps are stored from its second sighting on
ADMIT_AFTER = 2
# shapes seen but not yet admitted that are remembered (keys only)
SIGHTINGS_KEPT = 64


class BiasCache:
    """Bias maps of the most recently used input shapes that repeat.

    Agent attention's bias maps depend only on the token grid and on the
    bias parameters, so in inference they can be built once per grid. The
    maps are large (``heads * n * H * W`` values each), so only the
    ``max_shapes`` most recently used grids are kept, and an entry is valid
    only for the version it was built from (the parameter values and the
    precision the maps are computed in): any other version (after an
    optimizer step, ``load_state_dict``, a move to another device or dtype,
    or a forward under autocast to another precision) drops the entries of
    older versions.

    A grid is admitted only at its ``admit_after``-th sighting: before, its
    maps are built and returned but not kept, so a grid that never repeats
    (keep-ratio resizing in a detection test pipeline) costs what the
    uncached path costs. Sightings are counted per version, for
    the :data:`SIGHTINGS_KEPT` most recently seen grids not yet admitted; a
    grid dropped from the cache must be seen ``admit_after`` times again.

    Threads may share the cache (concurrent inference with one model): its
    records change under a lock, and maps are built outside it. A pickled
    or deep-copied cache (``torch.save`` of a model, an EMA copy) starts
    empty.

    Args:
        max_shapes: Grids kept at most; 0 disables the cache.
        admit_after: Sighting of a grid from which its maps are kept; 1
            keeps them at once.
    """

    def __init__(self, max_shapes: int, admit_after: int = ADMIT_AFTER):
        self.max_shapes = max_shapes
        self.admit_after = admit_after
        self._lock = threading.Lock()
        self._entries: 'OrderedDict[tuple, Maps]' = OrderedDict()
        self._sightings: 'OrderedDict[tuple, int]' = OrderedDict()

    def __getstate__(self) -> dict:
        return dict(max_shapes=self.max_shapes, admit_after=self.admit_after)

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def get(self,
            shape: Tuple[int, int],
            version: tuple,
            compute: Callable[[], Maps],
            compute_for_once: Optional[Callable[[], Maps]] = None) -> Maps:
        """The maps of ``shape`` built from parameters at ``version``:
        cached, or computed by ``compute`` (and cached if the shape is
        admitted). Maps that are not cached are computed by
        ``compute_for_once`` where given (it may return memory that the
        caller reuses after this use)."""
        once = compute_for_once or compute
        if not self.max_shapes:
            return once()
        key = (tuple(shape), version)
        with self._lock:
            maps = self._entries.get(key)
            if maps is not None:
                self._entries.move_to_end(key)
                return maps
            self._drop_other_versions(version)
            admitted = self._admits(key)
        if not admitted:
            return once()
        with plain_tensors():  # kept: usable by later forwards with autograd
            maps = compute()
        with self._lock:
            self._entries.pop(key, None)  # stored meanwhile by another thread
            while len(self._entries) >= self.max_shapes:
                self._entries.popitem(last=False)
            self._entries[key] = maps
        return maps

    def _drop_other_versions(self, version: tuple) -> None:
        """Forget the entries and sightings of other versions."""
        for record in (self._entries, self._sightings):
            for stale in [key for key in record if key[1] != version]:
                del record[stale]

    def _admits(self, key: tuple) -> bool:
        """Count a sighting of ``key``, not cached: whether its maps are to
        be kept now."""
        seen = self._sightings.pop(key, 0) + 1
        if seen >= self.admit_after:
            return True
        self._sightings[key] = seen
        if len(self._sightings) > SIGHTINGS_KEPT:
            self._sightings.popitem(last=False)
        return False

    def maps(self, shape: Tuple[int, int]) -> Optional[Maps]:
        """The cached maps of ``shape`` (any version), or None."""
        with self._lock:
            return next((maps
                         for (cached_shape, _), maps in self._entries.items()
                         if cached_shape == tuple(shape)), None)

    @property
    def shapes(self) -> List[Tuple[int, int]]:
        """The cached grids, least recently used first."""
        with self._lock:
            return [shape for shape, _ in self._entries]

    @property
    def pending_shapes(self) -> List[Tuple[int, int]]:
        """The grids seen but not yet admitted, least recently seen
        first."""
        with self._lock:
            return [shape for shape, _ in self._sightings]

    @property
    def nbytes(self) -> int:
        """Memory held by the cached maps."""
        with self._lock:
            return sum(t.numel() * t.element_size()
                       for maps in self._entries.values() for t in maps)

    def clear(self) -> None:
        """Drop every cached map and every sighting."""
        with self._lock:
            self._entries.clear()
            self._sightings.clear()

    def __len__(self) -> int:
        return len(self._entries)
