"""Training-engine pieces of agent_mm."""
from .model_wrapper import CPUDistributedDataParallel
from .optim_wrapper import CPUAmpOptimWrapper

__all__ = ['CPUAmpOptimWrapper', 'CPUDistributedDataParallel']
