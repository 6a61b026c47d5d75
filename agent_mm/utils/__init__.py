"""Utilities of agent_mm."""
from .allocator import keep_freed_memory
from .checkpoint_io import (SAFE_LOADERS, CheckpointError, load_from_local,
                            read_checkpoint, register_safe_globals)

__all__ = [
    'CheckpointError', 'SAFE_LOADERS', 'keep_freed_memory', 'load_from_local',
    'read_checkpoint', 'register_safe_globals'
]
