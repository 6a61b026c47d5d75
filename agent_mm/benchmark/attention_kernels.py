"""Agent attention's two softmax attentions at a model's own shapes, each
computed by several kernels, side by side.

The fast path hands both attentions to PyTorch's fused kernel
(``scaled_dot_product_attention`` with the bias as a dense mask). Here the
same problems are also computed by the explicit products (``baddbmm``,
softmax, ``bmm``), by those products one head and block of rows at a time
(:func:`agent_mm.ops.blocked_attention.blocked_attention`, what the fast
path calls in bfloat16 on a CPU without AMX) and, for a problem with few
queries over many keys (the agents reading every token), by the fused kernel
over chunks of the keys run as extra heads, whose outputs are combined by
their log-sum-exp (as split-key decoding kernels do). Each kernel is checked
against the fused one and timed round-robin with the others
(:func:`agent_mm.utils.timing.interleaved_times`).
"""
import functools
import math
import statistics
from typing import Callable, Dict, List, NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from ..models.layers import biased_attention
from ..models.padded_agents import padded_agent_count
from ..ops.blocked_attention import blocked_attention
from ..utils.timing import interleaved_times
from .attention_calls import attention_calls
from .profile import CPU, attention_flops

KEY_CHUNKS = 8
# the two attentions of agent attention
AGENTS_FROM_TOKENS, TOKENS_FROM_AGENTS = 'agents <- tokens', 'tokens <- agents'


class Problem(NamedTuple):
    """One attention ``softmax(scale * q kᵀ + bias) v`` of batch 1."""
    side: str  # AGENTS_FROM_TOKENS or TOKENS_FROM_AGENTS
    heads: int
    queries: int
    keys: int
    head_dims: int

    @property
    def flops(self) -> int:
        """Both products, 2 flops per multiply-add."""
        return attention_flops([(self.heads, rows, self.head_dims)
                                for rows in (self.queries, self.keys,
                                             self.keys)])


def model_problems(model: nn.Module, inputs: Tensor) -> List[Problem]:
    """The distinct attentions of ``model``'s agent attention
    modules in a forward of ``inputs`` (batch 1), in the order met."""
    problems: List[Problem] = []
    for module, hw_shape in attention_calls(model, inputs[:1]):
        tokens = math.prod(hw_shape)
        agents = math.prod(module.agent_shape)
        shape = (module.num_heads, module.head_dims)
        for side, queries, keys in ((AGENTS_FROM_TOKENS, agents, tokens),
                                    (TOKENS_FROM_AGENTS, tokens, agents)):
            problem = Problem(side, shape[0], queries, keys, shape[1])
            if problem not in problems:
                problems.append(problem)
    return problems


def problem_as_run(problem: Problem, dtype: torch.dtype,
                   device: torch.device) -> Problem:
    """``problem`` with the key count the fast path gives the kernel in
    ``dtype`` on ``device``: agents as keys are padded there
    (:func:`~agent_mm.models.padded_agents.padded_agent_count`)."""
    if problem.side != TOKENS_FROM_AGENTS:
        return problem
    return problem._replace(
        keys=padded_agent_count(problem.keys, dtype, device))


class Kernel(NamedTuple):
    """An attention kernel ``run(q, k, v, bias, scale)`` on ``(1, heads, *,
    d)`` inputs, with the layout of the bias it reads, made from the
    ``(heads, L, S)`` map before timing (the fast path would build the map
    in that layout)."""
    run: Callable[[Tensor, Tensor, Tensor, Tensor, float], Tensor]
    bias_layout: Callable[[Tensor], Tensor]

    def __call__(self, query: Tensor, key: Tensor, value: Tensor,
                 bias: Tensor, scale: float) -> Tensor:
        """The attention, from the bias in the ``(heads, L, S)`` layout."""
        return self.run(query, key, value, self.bias_layout(bias), scale)


def explicit_attention(query: Tensor, key: Tensor, value: Tensor,
                       bias: Tensor, scale: float) -> Tensor:
    """The logits by ``baddbmm``, their softmax, then ``bmm``."""
    logits = torch.baddbmm(
        bias, query[0], key[0].transpose(1, 2), alpha=scale)
    return torch.bmm(logits.softmax(-1), value[0]).unsqueeze(0)


def key_chunks_layout(bias: Tensor, chunks: int) -> Tensor:
    """``(heads, L, S)`` → ``(1, heads * chunks, L, S / chunks)``: each
    run of the keys as a head of its own."""
    heads, queries, keys = bias.shape
    return bias.view(heads, queries, chunks, keys // chunks).transpose(
        1, 2).reshape(1, heads * chunks, queries, keys // chunks)


def key_split_attention(query: Tensor, key: Tensor, value: Tensor,
                        mask: Tensor, scale: float) -> Tensor:
    """The fused kernel over equal runs of the keys laid out as extra heads
    (``mask`` in :func:`key_chunks_layout`), the partial outputs weighted
    by the softmax of their log-sum-exps."""
    _, heads, queries, dims = query.shape
    chunks = mask.shape[1] // heads
    size = key.shape[2] // chunks
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query.unsqueeze(2).expand(-1, -1, chunks, -1, -1).reshape(
            1, heads * chunks, queries, dims),
        key.reshape(1, heads * chunks, size, dims),
        value.reshape(1, heads * chunks, size, dims),
        attn_mask=mask,
        scale=scale)
    weights = lse.view(heads, chunks, queries).float().softmax(1)
    out = out.view(heads, chunks, queries, dims)
    return (out * weights.unsqueeze(-1).to(out.dtype)).sum(1).unsqueeze(0)


# the fast path's call (but for bfloat16 on a CPU without AMX: 'blocked')
FUSED = Kernel(biased_attention, lambda bias: bias)


def kernels_for(problem: Problem, device: torch.device) -> Dict[str, Kernel]:
    """The kernels that apply to ``problem``: the key split only on the
    CPU, for keys that split evenly and outnumber the queries."""
    kernels = {
        'fused': FUSED,
        'explicit': Kernel(explicit_attention, lambda bias: bias),
        'blocked': Kernel(blocked_attention, lambda bias: bias),
    }
    if (device.type == 'cpu' and problem.keys % KEY_CHUNKS == 0
            and problem.keys > problem.queries):
        kernels[f'key split ×{KEY_CHUNKS}'] = Kernel(
            key_split_attention,
            functools.partial(key_chunks_layout, chunks=KEY_CHUNKS))
    return kernels


def problem_inputs(problem: Problem, dtype: torch.dtype,
                   device: torch.device) -> tuple:
    """Random query, key, value ``(1, heads, *, d)`` and bias ``(heads,
    L, S)``, the bias contiguous as the fast path builds it."""
    heads, queries, keys, dims = problem[1:]
    query, key, value = (torch.randn(1, heads, n, dims, device=device)
                         for n in (queries, keys, keys))
    bias = 0.5 * torch.randn(heads, queries, keys, device=device)
    return tuple(t.to(dtype) for t in (query, key, value, bias))


def compare_kernels(problem: Problem, dtype: torch.dtype, repeats: int,
                    device: torch.device = CPU) -> Dict[str, dict]:
    """Median time, rate and largest difference from the fused kernel of
    every kernel of ``problem``, timed round-robin."""
    query, key, value, bias = problem_inputs(problem, dtype, device)
    scale = problem.head_dims**-0.5
    kernels = kernels_for(problem, device)
    steps = {
        name: functools.partial(kernel.run, query, key, value,
                                kernel.bias_layout(bias), scale)
        for name, kernel in kernels.items()
    }
    with torch.no_grad():
        outputs = {name: step().float() for name, step in steps.items()}
        times = interleaved_times(steps, 1, repeats, device)
    errors = {
        name: float((out - outputs['fused']).abs().max())
        for name, out in outputs.items()
    }
    fused_seconds = statistics.median(times['fused'])
    results = {}
    for name in kernels:
        seconds = statistics.median(times[name])
        results[name] = dict(
            ms=1000 * seconds,
            gflops=problem.flops / seconds / 1e9,
            vs_fused=seconds / fused_seconds,
            max_diff=errors[name])
    return results


def markdown_rows(problem: Problem, dtype: str,
                  results: Dict[str, dict]) -> List[str]:
    """Table rows of :func:`compare_kernels`' results."""
    shape = (f'{problem.heads} × {problem.queries} × {problem.keys} × '
             f'{problem.head_dims}')
    return [
        f'| {problem.side} | {shape} | {dtype} | {name} | {r["ms"]:.1f} | '
        f'{r["gflops"]:.0f} | {r["vs_fused"]:.2f} | {r["max_diff"]:.1e} |'
        for name, r in results.items()
    ]


TABLE_HEADER = [
    '| Attention | heads × queries × keys × d | Dtype | Kernel | ms '
    '(median) | GFLOP/s | × fused | max diff |',
    '|---|---|---|---|---:|---:|---:|---:|',
]
