"""Utilities of agent_mm."""
from .checkpoint_io import (SAFE_LOADERS, CheckpointError, load_from_local,
                            read_checkpoint, register_safe_globals)

__all__ = [
    'CheckpointError', 'SAFE_LOADERS', 'load_from_local', 'read_checkpoint',
    'register_safe_globals'
]
