"""Models of agent_mm, registered in mmengine's root ``MODELS`` registry.

mmdet's and mmseg's ``MODELS`` registries are children of that root and fall
back to it, so ``dict(type='AgentPVT')`` builds from either codebase.
"""
from .agent_attention import AgentAttention
from .agent_attention_2d import AgentAttention2d
from .agent_pvt import AgentPVT
from .agent_swin import AgentSwinTransformer
from .checkpoint import extract_backbone_state_dict, load_backbone_checkpoint

__all__ = [
    'AgentAttention', 'AgentAttention2d', 'AgentPVT', 'AgentSwinTransformer',
    'extract_backbone_state_dict', 'load_backbone_checkpoint'
]
