"""Agent attention (Han et al., "Agent Attention", ECCV 2024).

A small grid of agent tokens, pooled from the queries, first gathers from all
keys/values with softmax attention, then every query reads from the agents.
Both attentions carry learned position biases that are interpolated to the
current token grid, so the module works at any input resolution.
"""
import functools
import math
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from mmengine.registry import MODELS
from torch import Tensor

from ..ops.blocked_attention import blocked_attention, prefers_blocks
from ..ops.shared_bias_attention import shared_bias_attention
from .bias_cache import ADMIT_AFTER, BiasCache, CacheBudget
from .bias_maps import (agent_grid_matrix, pool_tokens, separable_bias,
                        weights_like)
from .checks import check_agent_attention, check_tokens
from .folded_bias import FoldedBias, folded_bias_attention, folds_bias
from .layers import (ChannelsLastConv2d, biased_attention, calls_plain_forward,
                     compute_dtype, is_plain_linear, linear_into,
                     map_to_tokens, merge_heads, residual_sum, split_heads,
                     tokens_to_map)
from .literal_agent_attention import literal_agent_attention
from .padded_agents import pad_agents, padded_agent_count
from .traced_agent_attention import traced_agent_attention
from .tracing import exporting
from .workspace import workspace_buffer

BIAS_CACHE_SIZE = 2
BIAS_NAMES = ('an_bias', 'na_bias', 'ah_bias', 'aw_bias', 'ha_bias', 'wa_bias')
Sources = Tuple[Tensor, Tensor, Tensor]
# the two maps, or both as low-rank factors
Biases = Union[Tuple[Tensor, Tensor], FoldedBias]


@MODELS.register_module()
class AgentAttention(BaseModule):
    """Global agent attention over a ``H×W`` token map.

    Args:
        embed_dims: Channels ``C``.
        num_heads: Number of heads; ``C`` must be divisible by it.
        pretrain_grid: The token grid ``(r_h, r_w)`` the row/column biases
            were learned on (shape of the ``ah/aw/ha/wa`` biases, resized
            to the input's grid); the backbones pass the stage's grid of
            their ``pretrain_img_size`` images.
        agent_num: Number of learned bias agents, a square ``p*p``.
        agent_shape: Agent grid ``(a_h, a_w)`` used downstream.
        qkv_bias: Whether the projections have a bias.
        fused_qkv: One ``qkv`` projection (Swin layout) instead of ``q`` and
            ``kv`` (PVT layout).
        attn_drop: Dropout on both attention maps.
        proj_drop: Dropout after ``proj``.
        attn_impl: ``'fast'`` (biases computed once and broadcast over the
            batch, fused attention kernels, no attention map stored for
            backward and a bias map only where it is no larger than the
            queries or keys (:func:`~agent_mm.ops.shared_bias_attention.
            keeps_bias`; else rebuilt from its sources),
            :class:`BiasCache` in eval) or
            ``'reference'`` (:mod:`.literal_agent_attention`, the equations
            computed as the authors do; for debugging and benchmarks). A
            graph traced for export takes :mod:`.traced_agent_attention`.
        bias_cache_size: Input shapes whose bias maps the fast path keeps in
            eval mode (:attr:`bias_cache`); 0 turns the cache off. Each shape
            costs ``2 * heads * n * H * W`` values (a few more where the
            agents are padded: :meth:`key_agents`).
        bias_cache_admit_after: Forward of an input shape from which its
            bias maps are cached (default 2: shapes that repeat, as the
            crops of sliding-window inference; a keep-ratio test pipeline
            seldom repeats one); 1 caches every shape at once.
        bias_cache_budget: The bytes the cache may hold, shared with other
            attentions (a backbone's ``bias_cache_max_mb``); None for no
            bound.
        qk_scale: Factor of the dot products; ``None`` for ``d ** -0.5``
            (as mmdet's and mmseg's Swin take it).
        init_cfg: mmengine initialisation config.

    Attributes:
        fold_biases (bool): Whether maps built for one forward in eval may
            come as low-rank factors folded into the attention's products
            where :func:`~.folded_bias.folds_bias` says it pays (default
            True); False always builds the maps. A folded forward agrees
            with one reading the cached maps to the rounding of its
            precision, not bit for bit: set False where repeated shapes
            must give bit-identical outputs in bfloat16.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 pretrain_grid: Tuple[int, int],
                 agent_num: int = 49,
                 agent_shape: Tuple[int, int] = (7, 7),
                 qkv_bias: bool = True,
                 fused_qkv: bool = False,
                 attn_drop: float = 0.,
                 proj_drop: float = 0.,
                 attn_impl: str = 'fast',
                 bias_cache_size: int = BIAS_CACHE_SIZE,
                 bias_cache_admit_after: int = ADMIT_AFTER,
                 bias_cache_budget: Optional[CacheBudget] = None,
                 qk_scale: Optional[float] = None,
                 init_cfg: Optional[dict] = None):
        super().__init__(init_cfg=init_cfg)
        check_agent_attention(embed_dims, num_heads, pretrain_grid,
                              agent_num, agent_shape, attn_drop, proj_drop,
                              attn_impl, bias_cache_size,
                              bias_cache_admit_after, qk_scale)
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.head_dims = embed_dims // num_heads
        self.scale = qk_scale or self.head_dims**-0.5
        self.agent_num = agent_num
        self.agent_shape = tuple(agent_shape)
        self.fused_qkv = fused_qkv
        self.attn_impl = attn_impl
        self.attn_drop_rate = attn_drop
        self.bias_cache = BiasCache(bias_cache_size, bias_cache_admit_after,
                                    bias_cache_budget)
        self.fold_biases = True

        if fused_qkv:
            self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=qkv_bias)
        else:
            self.q = nn.Linear(embed_dims, embed_dims, bias=qkv_bias)
            self.kv = nn.Linear(embed_dims, embed_dims * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = ChannelsLastConv2d(
            embed_dims, embed_dims, 3, padding=1, groups=embed_dims)

        grid_h, grid_w = pretrain_grid
        shapes = dict(
            an_bias=(num_heads, agent_num, 7, 7),
            na_bias=(num_heads, agent_num, 7, 7),
            ah_bias=(1, num_heads, agent_num, grid_h, 1),
            aw_bias=(1, num_heads, agent_num, 1, grid_w),
            ha_bias=(1, num_heads, grid_h, 1, agent_num),
            wa_bias=(1, num_heads, 1, grid_w, agent_num))
        for name in BIAS_NAMES:
            bias = nn.Parameter(torch.zeros(shapes[name]))
            trunc_normal_(bias, std=.02)
            setattr(self, name, bias)

    @property
    def bias_cache_size(self) -> int:
        """Input shapes whose bias maps are cached in eval mode."""
        return self.bias_cache.max_shapes

    @property
    def bias_cache_admit_after(self) -> int:
        """Forward of an input shape from which its bias maps are cached."""
        return self.bias_cache.admit_after

    # ------------------------------------------------------------------
    # position biases
    def bias_params(self) -> List[nn.Parameter]:
        """The six bias parameters, in :data:`BIAS_NAMES` order."""
        return [getattr(self, name) for name in BIAS_NAMES]

    def bias_sources(self) -> Tuple[Sources, Sources]:
        """The sources of the agent→token and token→agent biases: for each,
        the 7×7 map per agent, the row and the column maps, all as
        ``(heads, p*p, h, w)`` (the last two 1 wide or high)."""
        agent_to_token = (self.an_bias, self.ah_bias.squeeze(0),
                          self.aw_bias.squeeze(0))
        token_to_agent = (self.na_bias,
                          self.ha_bias.squeeze(0).permute(0, 3, 1, 2),
                          self.wa_bias.squeeze(0).permute(0, 3, 1, 2))
        return agent_to_token, token_to_agent

    def bias_builder(self,
                     hw_shape: Tuple[int, int],
                     token_major: bool,
                     agent_shape: Optional[Tuple[int, int]] = None
                     ) -> Callable[..., Tensor]:
        """:func:`separable_bias` for this module and token grid, for its
        agent grid or ``agent_shape``."""
        return functools.partial(
            separable_bias,
            hw_shape=tuple(hw_shape),
            agent_shape=tuple(agent_shape or self.agent_shape),
            token_major=token_major)

    @torch.compiler.disable
    def biases(self, hw_shape: Tuple[int, int]) -> Biases:
        """Agent→token bias ``(heads, n, N)`` and token→agent ``(heads, N,
        m)``, ``m`` being :meth:`key_agents` (``n``, or ``n`` padded),
        shared by the batch; from :attr:`bias_cache` when nothing is
        trained, where maps that are not cached may come as their
        :class:`~.folded_bias.FoldedBias` factors instead
        (:func:`~.folded_bias.folds_bias`). Run eagerly under
        ``torch.compile`` (the cache's key reads storage addresses, which a
        graph cannot)."""
        frozen = not (self.training or self.records_bias_grads())
        if frozen:
            return self.bias_cache.get(
                hw_shape, self._maps_version(),
                lambda: self.build_biases(hw_shape, frozen=True),
                lambda: self._biases_for_once(hw_shape),
                self.bias_params())
        return self.build_biases(hw_shape)

    def records_bias_grads(self) -> bool:
        """Whether autograd records the position biases: it is on and any
        of the six bias parameters requires grad (also when only some are
        frozen)."""
        return torch.is_grad_enabled() and any(
            param.requires_grad for param in self.bias_params())

    def _biases_for_once(self, hw_shape: Tuple[int, int]) -> Biases:
        """The biases of a forward whose maps are not cached: folded where
        :attr:`fold_biases` allows and :func:`~.folded_bias.folds_bias`
        says it pays, else the maps in the open workspace's buffers."""
        if self.fold_biases and folds_bias(
                math.prod(self.agent_shape), self.head_dims, self.agent_num,
                compute_dtype(self.an_bias), self.an_bias.device):
            return self.folded_biases(hw_shape)
        return self.build_biases(hw_shape, frozen=True, for_once=True)

    def folded_biases(self, hw_shape: Tuple[int, int]) -> FoldedBias:
        """Both biases as low-rank factors
        (:class:`~.folded_bias.FoldedBias`): the maps built for the ``p×p``
        grid of bias agents and the weights that resize that grid to the
        agent grid."""
        side = math.isqrt(self.agent_num)
        agent_to_token, token_to_agent = self.bias_sources()
        keys = self.bias_builder(hw_shape, False,
                                 (side, side))(*agent_to_token)
        queries = self.bias_builder(hw_shape, True,
                                    (side, side))(*token_to_agent)
        grid = weights_like(
            agent_grid_matrix, side, *self.agent_shape, like=queries)
        return FoldedBias(grid, keys.transpose(1, 2), queries)

    def build_biases(self,
                     hw_shape: Tuple[int, int],
                     frozen: bool = False,
                     for_once: bool = False) -> Tuple[Tensor, Tensor]:
        """Both maps, the token→agent one with :meth:`key_agents` agents;
        ``frozen`` ones (for inference, see :meth:`biases`) by the fastest
        build without autograd, and with ``for_once`` written into the
        buffers of the open workspace (:mod:`.workspace`), if any."""
        maps = []
        for token_major, sources in zip((False, True), self.bias_sources()):
            agents = (self.key_agents()
                      if token_major else math.prod(self.agent_shape))
            out = (self._map_buffer(hw_shape, token_major, agents)
                   if for_once else None)
            maps.append(
                self.bias_builder(hw_shape, token_major)(
                    *sources,
                    out=out,
                    agent_count=agents,
                    differentiable=not frozen))
        return tuple(maps)

    def key_agents(self) -> int:
        """Agents of the token→agent map, the keys of its fused kernel:
        the agent grid's, padded where
        :func:`~.padded_agents.padded_agent_count` says it pays in the
        dtype the maps are computed in."""
        return padded_agent_count(
            math.prod(self.agent_shape), compute_dtype(self.an_bias),
            self.an_bias.device)

    def _map_buffer(self, hw_shape: Tuple[int, int], token_major: bool,
                    agents: int) -> Optional[Tensor]:
        """A workspace buffer for one map of ``hw_shape`` with ``agents``
        agents, in the dtype the maps are computed in (that of autocast, if
        on)."""
        tokens = hw_shape[0] * hw_shape[1]
        shape = ((self.num_heads, tokens, agents) if token_major else
                 (self.num_heads, agents, tokens))
        return workspace_buffer(
            'token-major' if token_major else 'agent-major', shape,
            compute_dtype(self.an_bias), self.an_bias.device)

    def _maps_version(self) -> tuple:
        """Identifies what the bias maps are built from: the bias
        parameters' current values (storage, device, dtype and in-place
        version counters, which optimizer steps and ``load_state_dict``
        bump) and the dtype the maps are computed in (that of autocast, if
        on), so that a float32 forward never reads maps rounded to a lower
        precision, nor a bfloat16 one casts float32 maps at every call."""
        params = self.bias_params()
        return (params[0].device, params[0].dtype, compute_dtype(params[0]),
                tuple((p.data_ptr(), p._version) for p in params))

    def train(self, mode: bool = True) -> 'AgentAttention':
        self.bias_cache.clear()
        return super().train(mode)

    # ------------------------------------------------------------------
    # forward
    def _project(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Query, key and value ``(B, N, C)``; in inference within a
        workspace, written into its buffer, each contiguous, where the
        layers allow it (:meth:`_reads_projection_weights`)."""
        batch, tokens, channels = x.shape
        out = None
        if not torch.is_grad_enabled() and self._reads_projection_weights():
            out = workspace_buffer('projections',
                                   (3, batch * tokens, channels),
                                   compute_dtype(x), x.device)
        if out is None:
            if self.fused_qkv:
                return self.qkv(x).chunk(3, dim=-1)
            return (self.q(x), *self.kv(x).chunk(2, dim=-1))
        rows = x.reshape(batch * tokens, channels)
        for part, (weight, bias) in zip(out, self._projection_weights()):
            linear_into(part, rows, weight, bias)
        return tuple(part.view(batch, tokens, channels) for part in out)

    def _reads_projection_weights(self) -> bool:
        """Whether the projections may be computed from their layers'
        weights (:meth:`_projection_weights`) instead of calling them: plain
        linear layers (:func:`~.layers.is_plain_linear`) without forward
        hooks."""
        layers = [self.qkv] if self.fused_qkv else [self.q, self.kv]
        return (all(is_plain_linear(layer) for layer in layers)
                and calls_plain_forward(*layers))

    def _projection_weights(self) -> List[Tuple[Tensor, Optional[Tensor]]]:
        """The weight and bias of the query, key and value projections:
        row blocks of the fused layers."""
        if self.fused_qkv:
            layers, blocks = [self.qkv] * 3, (0, 1, 2)
        else:
            layers, blocks = [self.q, self.kv, self.kv], (0, 0, 1)
        dims = self.embed_dims
        rows = [slice(i * dims, (i + 1) * dims) for i in blocks]
        return [(layer.weight[part],
                 None if layer.bias is None else layer.bias[part])
                for layer, part in zip(layers, rows)]

    def _attend_with_bias(self, query: Tensor, key: Tensor, value: Tensor,
                          bias: Tensor, dropout: float) -> Tensor:
        """``softmax(scale * q kᵀ + bias) v`` by the fused kernel
        (:func:`~.layers.biased_attention`), or by blocks of explicit
        products where those are faster (bfloat16 inference on a CPU
        without AMX, :func:`~agent_mm.ops.blocked_attention.
        prefers_blocks`)."""
        if prefers_blocks(query, key, value, bias, dropout=dropout):
            return blocked_attention(query, key, value, bias, self.scale)
        return biased_attention(query, key, value, bias, self.scale, dropout)

    def fast_attention(self, query: Tensor, key: Tensor, value: Tensor,
                       agents: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
        """Both attentions on ``(B, heads, *, d)`` inputs, biases shared by
        the batch; returns ``(B, heads, N, d)``."""
        dropout = self.attn_drop_rate if self.training else 0.
        trains = (torch.is_grad_enabled()
                  and query.requires_grad) or self.records_bias_grads()
        if trains and not dropout:
            # fused kernels give no gradient for a mask: keep only the small
            # bias sources and rebuild biases and weights in backward
            agent_to_token, token_to_agent = self.bias_sources()
            agent_value = shared_bias_attention(
                agents, key, value, self.scale,
                self.bias_builder(hw_shape, False), *agent_to_token)
            return shared_bias_attention(query, agents, agent_value,
                                         self.scale,
                                         self.bias_builder(hw_shape, True),
                                         *token_to_agent)
        biases = self.biases(hw_shape)
        if isinstance(biases, FoldedBias):
            agent_value = folded_bias_attention(agents, key, value,
                                                biases.agent_grid, biases.keys,
                                                self.scale)
            return folded_bias_attention(query, agents, agent_value,
                                         biases.queries, biases.agent_grid,
                                         self.scale)
        agent_bias, token_bias = biases
        agent_value = self._attend_with_bias(agents, key, value, agent_bias,
                                             dropout)
        keys = token_bias.shape[-1]
        return self._attend_with_bias(query, pad_agents(agents, keys),
                                      pad_agents(agent_value, keys),
                                      token_bias, dropout)

    def forward(self, x: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
        """Attend over ``x`` of shape ``(B, H*W, C)`` laid out as
        ``hw_shape``."""
        check_tokens(
            type(self).__name__, x, hw_shape, self.embed_dims,
            maps_module='AgentAttention2d')
        batch = len(x)
        query, key, value = self._project(x)
        agents = pool_tokens(query, hw_shape, self.agent_shape)
        heads = [
            split_heads(t, self.num_heads)
            for t in (query, key, value, agents)
        ]
        # an empty batch takes the literal path: it gives every bias a zero
        # gradient, as a convolution gives its weight
        if exporting():
            out = traced_agent_attention(self, *heads, hw_shape)
        elif self.attn_impl == 'fast' and batch:
            out = self.fast_attention(*heads, hw_shape)
        else:
            out = literal_agent_attention(self, *heads, hw_shape)
        out = residual_sum(
            merge_heads(out),
            map_to_tokens(self.dwc(tokens_to_map(value, hw_shape))))
        return self.proj_drop(self.proj(out))
