"""Training-engine pieces of agent_mm."""
from .checkpoint_hook import AtomicCheckpointHook
from .checkpoint_match import CheckpointMatchHook
from .feature_autocast import FeatureAutocastHook
from .model_wrapper import CPUDistributedDataParallel
from .optim_wrapper import CPUAmpOptimWrapper
from .resume import ResumeFallbackHook

__all__ = [
    'AtomicCheckpointHook', 'CheckpointMatchHook', 'CPUAmpOptimWrapper',
    'CPUDistributedDataParallel', 'FeatureAutocastHook', 'ResumeFallbackHook'
]
