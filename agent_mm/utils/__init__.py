"""Utilities of agent_mm."""
from .checkpoint_io import (CheckpointError, load_local_checkpoint,
                            register_safe_globals)

__all__ = ['CheckpointError', 'load_local_checkpoint', 'register_safe_globals']
