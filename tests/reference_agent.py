"""Literal, unfused reference implementation of Agent-PVT and Agent-Swin.

This module is the test oracle for ``agent_mm``'s backbones. It follows the
architecture contract (the shared spec ``agent-backbones.md``) equation by
equation, in order, with no fusion and no shortcuts:

* every attention matrix is materialised and normalised with an explicit
  ``torch.softmax``;
* the agent biases are built by the spec's two interpolations, in the spec's
  order, with ``F.interpolate(mode='bilinear', align_corners=False)``, and are
  expanded to every image of the batch before being added;
* shifted windows are computed with an explicit pad -> roll -> partition ->
  attention -> reverse -> roll back -> crop.

It is an eval-only oracle: no dropout, no drop path. Parameter and buffer
names are the authors' released names, so that
``production.load_state_dict(reference.state_dict())`` works.

Only ``torch`` / ``torch.nn`` are used (no mmengine, mmdet, mmseg or timm).
"""
from __future__ import annotations
import math
import zlib
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    'ReferenceAgentAttention',
    'ReferenceAgentPVT',
    'ReferenceAgentSwin',
    'randomize_',
]

# Token grid of every stage for a 224x224 image (patch 4, then /2 per stage).
PVT_REF_SIZES: Tuple[Tuple[int, int], ...] = ((56, 56), (28, 28), (14, 14),
                                              (7, 7))


def _bilinear(x: Tensor, size: Tuple[int, int]) -> Tensor:
    """The spec's only interpolation: bilinear, ``align_corners=False``."""
    return F.interpolate(
        x, size=tuple(size), mode='bilinear', align_corners=False)


def _trunc_normal_(t: Tensor, std: float = 0.02) -> None:
    """Truncated normal init at +-2 (absolute), as timm's default."""
    nn.init.trunc_normal_(t, mean=0.0, std=std, a=-2.0, b=2.0)


# ---------------------------------------------------------------------------
# Agent attention
# ---------------------------------------------------------------------------


def _agent_token_bias(source: Tensor, hw: Tuple[int, int], pool_size: int,
                      agent_shape: Tuple[int, int]) -> Tensor:
    """Spec steps 3/5 for one source map, without the final transpose.

    ``source`` (heads, agent_num, h', w')
      -> interpolate to (H, W)                 (heads, agent_num, H, W)
      -> view (heads, p, p, N)
      -> permute to (heads, N, p, p)
      -> interpolate to (a_h, a_w)             (heads, N, a_h, a_w)
      -> view (heads, N, n).
    """
    heads = source.shape[0]
    H, W = hw
    N = H * W
    n = agent_shape[0] * agent_shape[1]
    s = _bilinear(source, (H, W))
    s = s.reshape(heads, pool_size, pool_size, N)
    s = s.permute(0, 3, 1, 2)
    s = _bilinear(s, agent_shape)
    return s.reshape(heads, N, n)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, L, C) -> (B, heads, L, d), heads taking contiguous chunks of C."""
    B, L, C = x.shape
    return x.reshape(B, L, heads, C // heads).permute(0, 2, 1, 3)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, heads, L, d) -> (B, L, heads * d)."""
    B, heads, L, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(B, L, heads * d)


class ReferenceAgentAttention(nn.Module):
    """Global agent attention over one H x W map (spec, 'Agent attention').

    Args:
        dim: channels C.
        num_heads: heads; ``d = C / heads``.
        agent_num: ``p**2`` (size of the released bias tables).
        agent_shape: downstream agent grid ``(a_h, a_w)``; ``n = a_h * a_w``.
        ref_size: reference token grid ``(r_h, r_w)`` for a 224 image.
        fused_qkv: True -> ``qkv`` (Swin); False -> ``q`` + ``kv`` (PVT).
        qkv_bias: bias of the Q/K/V projections.
    """

    def __init__(self,
                 dim: int,
                 num_heads: int,
                 agent_num: int,
                 agent_shape: Tuple[int, int],
                 ref_size: Tuple[int, int],
                 fused_qkv: bool,
                 qkv_bias: bool = True) -> None:
        super().__init__()
        assert dim % num_heads == 0, (dim, num_heads)
        pool_size = int(round(math.sqrt(agent_num)))
        assert pool_size * pool_size == agent_num, \
            f'agent_num must be a square number, got {agent_num}'
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.agent_num = agent_num
        self.pool_size = pool_size
        self.agent_shape = (int(agent_shape[0]), int(agent_shape[1]))
        self.ref_size = (int(ref_size[0]), int(ref_size[1]))
        self.fused_qkv = fused_qkv

        if fused_qkv:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        else:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=True)

        r_h, r_w = self.ref_size
        heads = num_heads
        self.an_bias = nn.Parameter(torch.zeros(heads, agent_num, 7, 7))
        self.na_bias = nn.Parameter(torch.zeros(heads, agent_num, 7, 7))
        self.ah_bias = nn.Parameter(torch.zeros(1, heads, agent_num, r_h, 1))
        self.aw_bias = nn.Parameter(torch.zeros(1, heads, agent_num, 1, r_w))
        self.ha_bias = nn.Parameter(torch.zeros(1, heads, r_h, 1, agent_num))
        self.wa_bias = nn.Parameter(torch.zeros(1, heads, 1, r_w, agent_num))
        for name in ('an_bias', 'na_bias', 'ah_bias', 'aw_bias', 'ha_bias',
                     'wa_bias'):
            _trunc_normal_(getattr(self, name), std=0.02)

    # -- the two bias tensors (depend only on (H, W) and the parameters) ----

    def agent_to_token_bias(self, H: int, W: int) -> Tensor:
        """Spec step 3: ``P`` of shape (heads, n, N)."""
        src1 = self.an_bias  # (heads, agent_num, 7, 7)
        # (1, heads, A, r_h, 1) + (1, heads, A, 1, r_w) -> (heads, A, r_h, r_w)
        src2 = (self.ah_bias + self.aw_bias)[0]
        t1 = _agent_token_bias(src1, (H, W), self.pool_size, self.agent_shape)
        t2 = _agent_token_bias(src2, (H, W), self.pool_size, self.agent_shape)
        return t1.transpose(1, 2) + t2.transpose(1, 2)

    def token_to_agent_bias(self, H: int, W: int) -> Tensor:
        """Spec step 5: ``T`` of shape (heads, N, n)."""
        src1 = self.na_bias  # (heads, agent_num, 7, 7)
        # (1, heads, r_h, 1, A) + (1, heads, 1, r_w, A) -> (heads, r_h, r_w, A)
        src2 = (self.ha_bias + self.wa_bias)[0]
        src2 = src2.permute(0, 3, 1, 2)  # (heads, A, r_h, r_w)
        t1 = _agent_token_bias(src1, (H, W), self.pool_size, self.agent_shape)
        t2 = _agent_token_bias(src2, (H, W), self.pool_size, self.agent_shape)
        return t1 + t2

    # -- forward --------------------------------------------------------------

    def _project(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Spec step 1: Q, K, V, each (B, N, C)."""
        C = self.dim
        if self.fused_qkv:
            qkv = self.qkv(x)
            return qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
        kv = self.kv(x)
        return self.q(x), kv[..., :C], kv[..., C:]

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        """x (B, N, C) with N = H * W -> (B, N, C)."""
        B, N, C = x.shape
        assert N == H * W, f'{N} tokens for a {H}x{W} map'
        heads = self.num_heads
        n = self.agent_shape[0] * self.agent_shape[1]

        # 1. projections
        q, k, v = self._project(x)

        # 2. agent tokens: adaptive average pooling of Q as a (B, C, H, W) map
        q_map = q.transpose(1, 2).reshape(B, C, H, W)
        agents = F.adaptive_avg_pool2d(q_map, self.agent_shape)  # B,C,ah,aw
        agents = agents.reshape(B, C, n).transpose(1, 2)  # (B, n, C)

        qh = _split_heads(q, heads)  # (B, heads, N, d)
        kh = _split_heads(k, heads)  # (B, heads, N, d)
        vh = _split_heads(v, heads)  # (B, heads, N, d)
        ah = _split_heads(agents, heads)  # (B, heads, n, d)

        # 3. agent -> token bias, expanded per image
        P = self.agent_to_token_bias(H, W)  # (heads, n, N)
        P = P.unsqueeze(0).expand(B, heads, n, N)

        # 4. agent aggregation
        agent_logits = self.scale * (ah @ kh.transpose(-2, -1)) + P
        agent_attn = torch.softmax(agent_logits, dim=-1)  # (B, heads, n, N)
        agent_v = agent_attn @ vh  # (B, heads, n, d)

        # 5. token -> agent bias, expanded per image
        T = self.token_to_agent_bias(H, W)  # (heads, N, n)
        T = T.unsqueeze(0).expand(B, heads, N, n)

        # 6. agent broadcast
        token_logits = self.scale * (qh @ ah.transpose(-2, -1)) + T
        token_attn = torch.softmax(token_logits, dim=-1)  # (B, heads, N, n)
        out = token_attn @ agent_v  # (B, heads, N, d)

        # 7. merge heads, add depthwise conv of V, project
        out = _merge_heads(out)  # (B, N, C)
        v_map = v.transpose(1, 2).reshape(B, C, H, W)
        out = out + self.dwc(v_map).reshape(B, C, N).transpose(1, 2)
        return self.proj(out)


# ---------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------


class ReferenceMlp(nn.Module):
    """fc1 -> GELU (exact) -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _tokens_to_map(x: Tensor, H: int, W: int) -> Tensor:
    """(B, H*W, C) -> (B, C, H, W), row-major tokens."""
    B, N, C = x.shape
    return x.transpose(1, 2).reshape(B, C, H, W)


# ---------------------------------------------------------------------------
# Agent-PVT
# ---------------------------------------------------------------------------


class ReferenceSRAttention(nn.Module):
    """PVT spatial-reduction attention ('B').

    ``sr`` (Conv2d k = stride = sr_ratio) and ``norm`` (LayerNorm eps 1e-5)
    exist only when ``sr_ratio > 1``, as in PVT and the release.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int,
                 qkv_bias: bool = True) -> None:
        super().__init__()
        assert dim % num_heads == 0, (dim, num_heads)
        self.dim = dim
        self.num_heads = num_heads
        self.scale = (dim // num_heads)**-0.5
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        """x (B, N, C) -> (B, N, C)."""
        B, N, C = x.shape
        q = self.q(x)
        if self.sr_ratio > 1:
            reduced = self.sr(_tokens_to_map(x, H, W))  # (B, C, h, w)
            reduced = reduced.flatten(2).transpose(1, 2)  # (B, h*w, C)
            reduced = self.norm(reduced)
        else:
            reduced = x
        kv = self.kv(reduced)
        k, v = kv[..., :C], kv[..., C:]
        qh = _split_heads(q, self.num_heads)
        kh = _split_heads(k, self.num_heads)
        vh = _split_heads(v, self.num_heads)
        attn = torch.softmax(self.scale * (qh @ kh.transpose(-2, -1)), dim=-1)
        return self.proj(_merge_heads(attn @ vh))


class ReferencePVTBlock(nn.Module):
    """``x += attn(norm1(x)); x += mlp(norm2(x))``, norms eps 1e-6."""

    def __init__(self, attn: nn.Module, dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ReferenceMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        x = x + self.attn(self.norm1(x), H, W)
        x = x + self.mlp(self.norm2(x))
        return x


class ReferencePVTPatchEmbed(nn.Module):
    """Conv2d(k, stride=k, no padding; sizes floor) + LayerNorm (eps 1e-5)."""

    def __init__(self, in_channels: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: Tensor) -> Tuple[Tensor, int, int]:
        x = self.proj(x)
        H, W = x.shape[2], x.shape[3]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


def _pvt_pos_embed(pos_embed: Tensor, ref: Tuple[int, int], H: int,
                   W: int) -> Tensor:
    """Position embedding for an H x W grid (resized iff the grid differs)."""
    r_h, r_w = ref
    if (H, W) == (r_h, r_w):
        return pos_embed
    C = pos_embed.shape[-1]
    grid = pos_embed.reshape(1, r_h, r_w, C).permute(0, 3, 1, 2)
    grid = _bilinear(grid, (H, W))  # (1, C, H, W)
    return grid.reshape(1, C, H * W).permute(0, 2, 1)


class ReferenceAgentPVT(nn.Module):
    """Agent-PVT downstream backbone; returns the four stage maps."""

    def __init__(self,
                 depths: Sequence[int],
                 embed_dims: Sequence[int] = (64, 128, 320, 512),
                 num_heads: Sequence[int] = (1, 2, 5, 8),
                 mlp_ratios: Sequence[float] = (8, 8, 4, 4),
                 sr_ratios: Sequence[int] = (8, 4, 2, 1),
                 agent_num: Sequence[int] = (9, 16, 49, 49),
                 agent_shapes: Sequence[Tuple[int, int]] = (
                     (12, 12), (16, 16), (28, 28), (28, 28)),
                 attn_type: str = 'AAAA',
                 qkv_bias: bool = True,
                 in_channels: int = 3) -> None:
        super().__init__()
        assert len(attn_type) == 4 and set(attn_type) <= {'A', 'B'}, \
            f'PVT attn_type must be 4 letters of A/B, got {attn_type!r}'
        self.attn_type = attn_type
        self.ref_sizes = PVT_REF_SIZES
        for i in range(4):
            dim = embed_dims[i]
            patch = 4 if i == 0 else 2
            prev = in_channels if i == 0 else embed_dims[i - 1]
            setattr(self, f'patch_embed{i + 1}',
                    ReferencePVTPatchEmbed(prev, dim, patch))
            r_h, r_w = self.ref_sizes[i]
            pos = nn.Parameter(torch.zeros(1, r_h * r_w, dim))
            _trunc_normal_(pos, std=0.02)
            setattr(self, f'pos_embed{i + 1}', pos)
            blocks = []
            for _ in range(depths[i]):
                if attn_type[i] == 'A':
                    attn = ReferenceAgentAttention(
                        dim,
                        num_heads[i],
                        agent_num=int(agent_num[i]),
                        agent_shape=tuple(agent_shapes[i]),
                        ref_size=self.ref_sizes[i],
                        fused_qkv=False,
                        qkv_bias=qkv_bias)
                else:
                    attn = ReferenceSRAttention(
                        dim, num_heads[i], int(sr_ratios[i]), qkv_bias)
                blocks.append(ReferencePVTBlock(attn, dim, mlp_ratios[i]))
            setattr(self, f'block{i + 1}', nn.ModuleList(blocks))

    def forward(self, img: Tensor) -> List[Tensor]:
        """img (B, in, H, W) -> [(B, C_i, H_i, W_i) for the 4 stages]."""
        outs = []
        x = img
        for i in range(4):
            patch_embed = getattr(self, f'patch_embed{i + 1}')
            pos_embed = getattr(self, f'pos_embed{i + 1}')
            tokens, H, W = patch_embed(x)
            tokens = tokens + _pvt_pos_embed(pos_embed, self.ref_sizes[i], H,
                                             W)
            for blk in getattr(self, f'block{i + 1}'):
                tokens = blk(tokens, H, W)
            x = _tokens_to_map(tokens, H, W)
            outs.append(x)
        return outs


# ---------------------------------------------------------------------------
# Agent-Swin
# ---------------------------------------------------------------------------


def parse_swin_attn_type(attn_type: str, depths: Sequence[int]) -> List[
        List[str]]:
    """Per-stage, per-block 'A'/'B' from a Swin ``attn_type`` string.

    The first ``len(depths)`` characters are the stage letters ('A', 'B' or
    'M'); whatever follows is the number k of an 'M' stage, whose first k
    blocks are 'A' and the rest 'B'. E.g. 'AAMB2' with depths (2,2,18,2) ->
    stage 2 is ['A', 'A', 'B', ..., 'B'].
    """
    num_stages = len(depths)
    letters, suffix = attn_type[:num_stages], attn_type[num_stages:]
    assert len(letters) == num_stages and set(letters) <= {'A', 'B', 'M'}, \
        f'bad attn_type {attn_type!r}'
    if 'M' in letters:
        assert suffix.isdigit(), f"'M' needs a trailing number: {attn_type!r}"
        k = int(suffix)
    else:
        assert suffix == '', f'unexpected suffix in attn_type {attn_type!r}'
        k = 0
    types = []
    for letter, depth in zip(letters, depths):
        if letter == 'M':
            types.append(['A' if j < k else 'B' for j in range(depth)])
        else:
            types.append([letter] * depth)
    return types


def relative_position_index(ws: int) -> Tensor:
    """Standard Swin index (ws*ws, ws*ws) into a ((2ws-1)^2, heads) table."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing='ij'))
    coords = coords.flatten(1)  # (2, ws*ws)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    rel = rel.permute(1, 2, 0).contiguous()  # (N, N, 2)
    rel[:, :, 0] += ws - 1
    rel[:, :, 1] += ws - 1
    rel[:, :, 0] *= 2 * ws - 1
    return rel.sum(-1)


def window_partition(x: Tensor, ws: int) -> Tensor:
    """(B, H, W, C) -> (B * nW, ws*ws, C), windows in row-major order."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // ws, ws, W // ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)


def window_reverse(windows: Tensor, ws: int, H: int, W: int) -> Tensor:
    """(B * nW, ws*ws, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    B = windows.shape[0] // ((H // ws) * (W // ws))
    x = windows.reshape(B, H // ws, W // ws, ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


def shifted_window_mask(Hp: int, Wp: int, ws: int, shift: int) -> Tensor:
    """Standard Swin region mask (nW, ws*ws, ws*ws): 0 within, -100 across."""
    img_mask = torch.zeros(1, Hp, Wp, 1)
    slices = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    region = 0
    for hs in slices:
        for wsl in slices:
            img_mask[:, hs, wsl, :] = region
            region += 1
    mask_windows = window_partition(img_mask, ws).squeeze(-1)  # (nW, N)
    diff = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    return torch.where(diff != 0, torch.full_like(diff, -100.0),
                       torch.zeros_like(diff))


class ReferenceWindowAttention(nn.Module):
    """Swin window attention with relative position bias ('B')."""

    def __init__(self, dim: int, num_heads: int, window_size: int,
                 qkv_bias: bool = True) -> None:
        super().__init__()
        assert dim % num_heads == 0, (dim, num_heads)
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = (dim // num_heads)**-0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1)**2, num_heads))
        _trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer('relative_position_index',
                             relative_position_index(window_size))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, windows: Tensor, mask: Optional[Tensor]) -> Tensor:
        """windows (B*nW, N, C), mask (nW, N, N) or None -> (B*nW, N, C)."""
        BW, N, C = windows.shape
        heads = self.num_heads
        qkv = self.qkv(windows)
        q = _split_heads(qkv[..., :C], heads)
        k = _split_heads(qkv[..., C:2 * C], heads)
        v = _split_heads(qkv[..., 2 * C:], heads)
        attn = self.scale * (q @ k.transpose(-2, -1))  # (BW, heads, N, N)
        bias = self.relative_position_bias_table[
            self.relative_position_index.reshape(-1)]
        bias = bias.reshape(N, N, heads).permute(2, 0, 1)  # (heads, N, N)
        attn = attn + bias.unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.reshape(BW // nW, nW, heads, N, N)
            attn = attn + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.reshape(BW, heads, N, N)
        attn = torch.softmax(attn, dim=-1)
        return self.proj(_merge_heads(attn @ v))


class ReferenceSwinBlock(nn.Module):
    """Swin block, 'A' (global agent attention) or 'B' (shifted window)."""

    def __init__(self, dim: int, num_heads: int, block_type: str,
                 shift: int, window_size: int, mlp_ratio: float,
                 qkv_bias: bool, agent_num: int,
                 agent_shape: Tuple[int, int],
                 ref_size: Tuple[int, int]) -> None:
        super().__init__()
        assert block_type in ('A', 'B'), block_type
        self.block_type = block_type
        self.window_size = window_size
        self.shift = shift if block_type == 'B' else 0
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        if block_type == 'A':
            self.attn = ReferenceAgentAttention(
                dim,
                num_heads,
                agent_num=agent_num,
                agent_shape=agent_shape,
                ref_size=ref_size,
                fused_qkv=True,
                qkv_bias=qkv_bias)
        else:
            self.attn = ReferenceWindowAttention(dim, num_heads, window_size,
                                                 qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = ReferenceMlp(dim, int(dim * mlp_ratio))

    def _window_branch(self, x: Tensor, H: int, W: int) -> Tensor:
        """norm1(x) (B, N, C) -> shifted-window attention -> (B, N, C)."""
        B, N, C = x.shape
        ws, shift = self.window_size, self.shift
        x = x.reshape(B, H, W, C)
        pad_b = (ws - H % ws) % ws
        pad_r = (ws - W % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))  # zeros right/bottom
        Hp, Wp = H + pad_b, W + pad_r
        if shift > 0:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
            mask = shifted_window_mask(Hp, Wp, ws, shift).to(x)
        else:
            mask = None
        windows = window_partition(x, ws)
        windows = self.attn(windows, mask)
        x = window_reverse(windows, ws, Hp, Wp)
        if shift > 0:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        x = x[:, :H, :W, :]
        return x.reshape(B, H * W, C)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        y = self.norm1(x)
        if self.block_type == 'A':
            y = self.attn(y, H, W)
        else:
            y = self._window_branch(y, H, W)
        x = x + y
        x = x + self.mlp(self.norm2(x))
        return x


class ReferencePatchMerging(nn.Module):
    """Pad odd H/W bottom/right, concat phases (0,0),(1,0),(0,1),(1,1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=1e-5)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor, H: int, W: int) -> Tuple[Tensor, int, int]:
        B, N, C = x.shape
        x = x.reshape(B, H, W, C)
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([
            x[:, 0::2, 0::2, :],  # (row 0, col 0)
            x[:, 1::2, 0::2, :],  # (row 1, col 0)
            x[:, 0::2, 1::2, :],  # (row 0, col 1)
            x[:, 1::2, 1::2, :],  # (row 1, col 1)
        ], dim=-1)
        H2, W2 = x.shape[1], x.shape[2]
        x = x.reshape(B, H2 * W2, 4 * C)
        return self.reduction(self.norm(x)), H2, W2


class ReferenceSwinPatchEmbed(nn.Module):
    """Zero-pad right/bottom to a multiple of 4, Conv2d(4, 4), LayerNorm."""

    def __init__(self, in_channels: int, dim: int, patch: int = 4) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, img: Tensor) -> Tuple[Tensor, int, int]:
        p = self.patch
        H, W = img.shape[2], img.shape[3]
        img = F.pad(img, (0, (p - W % p) % p, 0, (p - H % p) % p))
        x = self.proj(img)
        Ht, Wt = x.shape[2], x.shape[3]
        return self.norm(x.flatten(2).transpose(1, 2)), Ht, Wt


class ReferenceSwinStage(nn.Module):
    """``blocks`` then optional ``downsample`` (PatchMerging)."""

    def __init__(self, blocks: List[nn.Module],
                 downsample: Optional[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


class ReferenceAgentSwin(nn.Module):
    """Agent-Swin downstream backbone; returns normed maps for out_indices."""

    def __init__(self,
                 depths: Sequence[int],
                 embed_dims: int = 96,
                 num_heads: Sequence[int] = (3, 6, 12, 24),
                 attn_type: str = 'AAAB',
                 agent_num: Sequence[int] = (9, 16, 49, 49),
                 agent_shapes: Sequence[Tuple[int, int]] = (
                     (9, 9), (12, 12), (14, 14), (7, 7)),
                 window_size: int = 7,
                 mlp_ratio: float = 4,
                 qkv_bias: bool = True,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 in_channels: int = 3) -> None:
        super().__init__()
        num_stages = len(depths)
        self.out_indices = tuple(out_indices)
        self.block_types = parse_swin_attn_type(attn_type, depths)
        self.num_features = [embed_dims * 2**i for i in range(num_stages)]
        self.patch_embed = ReferenceSwinPatchEmbed(in_channels, embed_dims)
        self.layers = nn.ModuleList()
        for i in range(num_stages):
            dim = self.num_features[i]
            ref = 56 // 2**i
            blocks = [
                ReferenceSwinBlock(
                    dim,
                    num_heads[i],
                    block_type=self.block_types[i][j],
                    shift=0 if j % 2 == 0 else window_size // 2,
                    window_size=window_size,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    agent_num=int(agent_num[i]),
                    agent_shape=tuple(agent_shapes[i]),
                    ref_size=(ref, ref)) for j in range(depths[i])
            ]
            downsample = (
                ReferencePatchMerging(dim) if i < num_stages - 1 else None)
            self.layers.append(ReferenceSwinStage(blocks, downsample))
        for i in self.out_indices:
            self.add_module(f'norm{i}',
                            nn.LayerNorm(self.num_features[i], eps=1e-5))

    def forward(self, img: Tensor) -> List[Tensor]:
        """img (B, in, H, W) -> [(B, C_i, H_i, W_i) for i in out_indices]."""
        x, H, W = self.patch_embed(img)
        outs = []
        for i, layer in enumerate(self.layers):
            for blk in layer.blocks:
                x = blk(x, H, W)
            if i in self.out_indices:
                out = getattr(self, f'norm{i}')(x)
                outs.append(_tokens_to_map(out, H, W))
            if layer.downsample is not None:
                x, H, W = layer.downsample(x, H, W)
        return outs


# ---------------------------------------------------------------------------
# Parameter randomisation for parity tests
# ---------------------------------------------------------------------------


def _name_seed(seed: int, name: str) -> int:
    """A per-parameter seed that depends only on ``seed`` and the name."""
    return (seed * 1_000_003 + zlib.crc32(name.encode('utf-8'))) % (2**63)


@torch.no_grad()
def randomize_(module: nn.Module, std: float = 0.5, seed: int = 0) -> None:
    """Fill every parameter with deterministic random values (in place).

    Values depend only on ``(seed, parameter name, shape)``, never on module
    registration order, so two implementations with the same state_dict
    names get the same parameters. Rules, by name and shape:

    * ``*weight`` with >= 2 dims (Linear / Conv): N(0, (2*std)^2 / fan_in),
      i.e. unit gain at std=0.5, so activations and attention logits stay
      O(1) and the softmaxes stay sensitive instead of saturating;
    * ``*weight`` with 1 dim (LayerNorm): 1 + N(0, std^2);
    * everything else (all biases, the six agent biases, position
      embeddings, relative position bias tables): N(0, std^2).

    Buffers (e.g. ``relative_position_index``) are left untouched.
    """
    for name, param in module.named_parameters():
        gen = torch.Generator().manual_seed(_name_seed(seed, name))
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float64)
        leaf = name.rsplit('.', 1)[-1]
        if leaf == 'weight' and param.dim() >= 2:
            fan_in = param[0].numel()
            values = noise * (2.0 * std / math.sqrt(fan_in))
        elif leaf == 'weight':
            values = 1.0 + noise * std
        else:
            values = noise * std
        param.copy_(values.to(param.dtype))
