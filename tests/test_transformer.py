"""The shared pieces: the pre-norm block around any token mixer, the patch
embedding, the pre-training grids."""
import pytest
import torch
import torch.nn as nn
from backbone_checks import tiny

from agent_mm.models.transformer import (PRETRAIN_IMG_SIZE, PatchEmbed,
                                         TransformerBlock, pretrain_grid,
                                         resized_pos_embed)


class _RowMixer(nn.Module):
    """A token mixer that uses the grid: each token plus its row's mean."""

    def __init__(self, dims):
        super().__init__()
        self.proj = nn.Linear(dims, dims)

    def forward(self, x, hw_shape):
        rows = x.unflatten(1, hw_shape)
        return self.proj(x + rows.mean(2, keepdim=True).expand_as(
            rows).flatten(1, 2))


def _block(**kwargs):
    torch.manual_seed(0)
    return TransformerBlock(8, _RowMixer(8), mlp_ratio=2., **kwargs)


def _pre_norm(block, x, hw_shape):
    x = x + block.attn(block.norm1(x), hw_shape)
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize('grad', [True, False])
def test_block_is_pre_norm_residual_around_the_mixer(grad):
    block = _block().eval()
    x = torch.randn(2, 12, 8)
    with torch.set_grad_enabled(grad):
        expected = _pre_norm(block, x, (3, 4))
        out = block(x.clone(), (3, 4))
    torch.testing.assert_close(out, expected)


def _keep_outputs(kept):
    """A forward hook keeping each output (the tokens of a tuple) and a
    copy of it made in the hook."""

    def keep(module, inputs, output):
        tokens = output[0] if isinstance(output, tuple) else output
        kept.append((tokens, tokens.clone()))

    return keep


@pytest.mark.parametrize('hooked', ['attn', 'attn.proj', 'drop_path'])
def test_inference_leaves_what_a_forward_hook_kept_untouched(hooked):
    block = _block(drop_path_rate=0.1).eval()
    kept = []
    block.get_submodule(hooked).register_forward_hook(_keep_outputs(kept))
    x = torch.randn(2, 12, 8)
    with torch.no_grad():
        out = block(x, (3, 4))
    assert kept  # drop_path is called by both branches
    for tokens, copy in kept:
        torch.testing.assert_close(tokens, copy, atol=0, rtol=0)
    torch.testing.assert_close(out, _pre_norm(block, x, (3, 4)))


@pytest.mark.parametrize('name, kwargs', [('pvt', {}),
                                          ('swin',
                                           dict(use_abs_pos_embed=True))])
def test_backbone_inference_leaves_what_forward_hooks_kept_untouched(
        name, kwargs):
    model = tiny(name, **kwargs).eval()
    kept = []
    hooked = [
        module for path, module in model.named_modules()
        if path.split('.')[-1] in ('attn', 'patch_embed', 'patch_embed1')
    ]
    for module in hooked:
        module.register_forward_hook(_keep_outputs(kept))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert len(kept) == len(hooked)
    for tokens, copy in kept:
        torch.testing.assert_close(tokens, copy, atol=0, rtol=0)


def test_block_with_cp_gives_the_same_outputs_and_gradients():
    plain, checkpointed = _block(), _block(with_cp=True)
    x = torch.randn(2, 12, 8, requires_grad=True)
    outs, grads = [], []
    for block in (plain, checkpointed):
        out = block(x, (3, 4))
        grads.append(torch.autograd.grad(out.sum(), [x, *block.parameters()]))
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_block_norm_and_activation_come_from_the_configs():
    block = _block(
        norm_cfg=dict(type='LN', eps=1e-6), act_cfg=dict(type='ReLU'))
    assert block.norm1.eps == block.norm2.eps == 1e-6
    assert isinstance(block.mlp.act, nn.ReLU)
    assert _block().norm1.eps == 1e-5


@pytest.mark.parametrize('pad, expected', [(False, (4, 2)), (True, (5, 3))])
def test_patch_embed_floors_or_pads(pad, expected):
    embed = PatchEmbed(3, 6, 4, pad=pad)
    tokens, hw_shape = embed(torch.randn(2, 3, 17, 11))
    assert hw_shape == expected
    assert tokens.shape == (2, expected[0] * expected[1], 6)


def test_pretrain_grids_are_the_token_grids_of_a_224_image():
    assert PRETRAIN_IMG_SIZE == 224
    assert [pretrain_grid(i) for i in range(4)] == [(56, 56), (28, 28),
                                                    (14, 14), (7, 7)]


class _PosEmbedAdder(nn.Module):

    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, 7 * 7, 4))

    def forward(self, x):
        hw_shape = x.shape[2:]
        return resized_pos_embed(self.pos_embed, (7, 7), hw_shape)


def test_resized_pos_embed_is_the_same_in_an_exported_graph():
    module = _PosEmbedAdder()
    x = torch.zeros(1, 4, 12, 20)
    eager = module(x)
    assert eager.shape == (1, 12 * 20, 4)
    program = torch.export.export(module, (x, ), strict=False)
    torch.testing.assert_close(program.module()(x), eager)
    assert resized_pos_embed(module.pos_embed, (7, 7),
                             (7, 7)) is module.pos_embed
