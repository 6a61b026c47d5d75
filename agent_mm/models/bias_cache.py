"""The eval-time cache of agent attention's bias maps."""
from collections import OrderedDict
from typing import Callable, List, Optional, Tuple

from torch import Tensor

Maps = Tuple[Tensor, ...]


class BiasCache:
    """Bias maps of the most recently used input shapes.

    Agent attention's bias maps depend only on the token grid and on the
    bias parameters, so in inference they can be built once per grid. The
    maps are large (``heads * n * H * W`` values each), so only the
    ``max_shapes`` most recently used grids are kept, and an entry is valid
    only for the parameter version it was built from: any other version
    (after an optimizer step, ``load_state_dict`` or a move to another
    device or dtype) drops the entries of older versions.

    Args:
        max_shapes: Grids kept at most; 0 disables the cache.
    """

    def __init__(self, max_shapes: int):
        self.max_shapes = max_shapes
        self._entries: 'OrderedDict[tuple, Maps]' = OrderedDict()

    def get(self, shape: Tuple[int, int], version: tuple,
            compute: Callable[[], Maps]) -> Maps:
        """The maps of ``shape`` built from parameters at ``version``:
        cached, or computed by ``compute`` and cached."""
        if not self.max_shapes:
            return compute()
        key = (tuple(shape), version)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        for stale in [k for k in self._entries if k[1] != version]:
            del self._entries[stale]
        while len(self._entries) >= self.max_shapes:
            self._entries.popitem(last=False)
        self._entries[key] = compute()
        return self._entries[key]

    def maps(self, shape: Tuple[int, int]) -> Optional[Maps]:
        """The cached maps of ``shape`` (any version), or None."""
        for (cached_shape, _), maps in self._entries.items():
            if cached_shape == tuple(shape):
                return maps
        return None

    @property
    def shapes(self) -> List[Tuple[int, int]]:
        """The cached grids, least recently used first."""
        return [shape for shape, _ in self._entries]

    @property
    def nbytes(self) -> int:
        """Memory held by the cached maps."""
        return sum(t.numel() * t.element_size()
                   for maps in self._entries.values() for t in maps)

    def clear(self) -> None:
        """Drop every cached map."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
