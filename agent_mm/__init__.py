"""agent_mm: agent attention backbones for OpenMMLab 2.x.

Importing the package registers ``AgentAttention``, ``AgentPVT`` and
``AgentSwinTransformer`` in mmengine's root ``MODELS`` registry (so mmdet,
mmseg and every other OpenMMLab 2.x codebase find them) and makes mmengine
read checkpoints safely under ``torch.load(weights_only=True)``.
"""
from .engine import CPUAmpOptimWrapper
from .models import AgentAttention, AgentPVT, AgentSwinTransformer
from .utils import register_safe_globals
from .version import __version__

register_safe_globals()

__all__ = [
    '__version__', 'AgentAttention', 'AgentPVT', 'AgentSwinTransformer',
    'CPUAmpOptimWrapper'
]
