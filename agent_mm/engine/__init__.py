"""Training-engine pieces of agent_mm."""
from .optim_wrapper import CPUAmpOptimWrapper

__all__ = ['CPUAmpOptimWrapper']
