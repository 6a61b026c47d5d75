"""Utilities of agent_mm."""
from .allocator import keep_freed_memory
from .checkpoint_io import (CheckpointError, read_checkpoint,
                            register_safe_globals)

__all__ = [
    'CheckpointError', 'keep_freed_memory', 'read_checkpoint',
    'register_safe_globals'
]
