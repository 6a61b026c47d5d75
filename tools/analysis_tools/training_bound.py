"""How much faster can agent attention train than the reference path?

Times Agent-PVT training steps (forward + backward of the summed outputs)
side by side, round-robin and warm as ``benchmark_backbones.py`` does, for
four variants with the same weights:

- ``reference``: the literal path (bias maps built at every call, for every
  image of the batch);
- ``fast``: the default path;
- ``constant_bias``: the reference path with every bias map replaced by a
  constant computed once: no bias map is built and no bias gradient is
  computed. It does less bias work than any correct implementation, so
  ``constant_bias / reference`` bounds the training-time ratio of an
  implementation that computes the attention as the reference does
  (products and softmax unfused);
- ``products_only``: ``constant_bias`` with each attention reduced to its
  two matrix products ``(scale * q kᵀ) v`` (no bias, no softmax): what is
  left is the work every exact implementation does, whatever its kernels,
  unless it computes the same products faster than the reference's
  ``torch.matmul`` calls.

Example::

    python tools/analysis_tools/training_bound.py --size 512 --batch 2
"""
import argparse
import functools
import statistics
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from agent_mm.models import AgentAttention, AgentPVT
from agent_mm.utils.timing import interleaved_times, train_step

VARIANTS = ('reference', 'fast', 'constant_bias', 'products_only')
Biases = Tuple[Tensor, Tensor]
BiasFn = Callable[[Tuple[int, int], int], Biases]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--arch', default='tiny', help='Agent-PVT arch')
    parser.add_argument('--size', type=int, default=512, help='input side')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=1,
                        help='untimed calls right before each timed call')
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--seed', type=int, default=0)
    return parser.parse_args(argv)


def agent_attentions(model: nn.Module) -> List[AgentAttention]:
    """The agent attention modules of ``model``."""
    return [m for m in model.modules() if isinstance(m, AgentAttention)]


def use_constant_biases(model: nn.Module) -> None:
    """Make every agent attention of a reference-path ``model`` use bias
    maps computed once per input shape (for one image, broadcast over the
    batch) and detached, so they cost nothing and get no gradient."""
    for module in agent_attentions(model):
        module._reference_biases = _constant(module._reference_biases)


def use_products_only(model: nn.Module) -> None:
    """Reduce every agent attention of a reference-path ``model`` to its
    two matrix products, ``(scale * q kᵀ) v``: no bias, no softmax, no
    dropout (the outputs are not agent attention's)."""
    for module in agent_attentions(model):
        module._literal_attention = functools.partial(_bare_products,
                                                      module.scale)


def _bare_products(scale: float, query: Tensor, key: Tensor, value: Tensor,
                   bias: Tensor) -> Tensor:
    """``(scale * q kᵀ) v``; ``bias`` is ignored."""
    return torch.matmul(query * scale, key.transpose(-2, -1)) @ value


def _constant(compute: BiasFn) -> BiasFn:
    """``compute(hw_shape, batch)`` memoised per shape, without autograd."""
    cache: Dict[Tuple[int, int], Biases] = {}

    def biases(hw_shape: Tuple[int, int], batch: int) -> Biases:
        key = tuple(hw_shape)
        if key not in cache:
            with torch.no_grad():
                cache[key] = compute(key, 1)
        return cache[key]

    return biases


def build_variants(arch: str) -> Dict[str, nn.Module]:
    """The variants, in train mode, all with the weights of the
    first one built (the reference)."""
    models = {}
    for name in VARIANTS:
        impl = 'fast' if name == 'fast' else 'reference'
        model = AgentPVT(arch=arch, attn_impl=impl, init_cfg=None).train()
        if models:
            model.load_state_dict(models['reference'].state_dict())
        models[name] = model
    for name in ('constant_bias', 'products_only'):
        use_constant_biases(models[name])
    use_products_only(models['products_only'])
    return models


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Print each variant's median time (ms) and its ratio to the
    reference's; return the medians."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    models = build_variants(args.arch)
    inputs = torch.randn(args.batch, 3, args.size, args.size)
    steps = {name: train_step(model, inputs) for name, model in models.items()}
    times = interleaved_times(steps, args.warmup, args.repeats,
                              torch.device('cpu'))
    medians = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    print(f'Agent-PVT ({args.arch}) train, {args.size}x{args.size}, batch '
          f'{args.batch}, {torch.get_num_threads()} threads, median of '
          f'{args.repeats}:')
    for name, ms in medians.items():
        print(f'  {name:14s} {ms:9.1f} ms  '
              f'{ms / medians["reference"]:.3f} x reference')
    return medians


if __name__ == '__main__':
    main()
