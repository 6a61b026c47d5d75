"""Both backbones and the CNN plug-in under CPU autocast (bfloat16 and
float16): eval outputs within the dtype's tolerance of float32, training
gives finite gradients to every parameter."""
import pytest
import torch

from agent_mm.models import AgentAttention2d, AgentPVT, AgentSwinTransformer

# relative error of the outputs (max abs error / max abs value)
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
MODELS = {
    'pvt': lambda: AgentPVT(depths=[1, 1, 1, 1], attn_type='AAAB'),
    'swin': lambda: AgentSwinTransformer(
        embed_dims=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8],
        attn_type='AAMB1'),
    'plugin': lambda: AgentAttention2d(
        in_channels=64, layer_scale_init_value=1.),
}
INPUTS = {'pvt': (2, 3, 64, 96), 'swin': (2, 3, 64, 96),
          'plugin': (2, 64, 13, 17)}


def _outputs(out):
    return out if isinstance(out, (tuple, list)) else (out, )


def _build(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    model.init_weights()
    return model, torch.randn(INPUTS[name])


@pytest.mark.parametrize('dtype', list(TOLERANCE), ids=['bf16', 'fp16'])
@pytest.mark.parametrize('name', sorted(MODELS))
def test_eval_under_autocast_is_within_tolerance(name, dtype):
    model, x = _build(name)
    model.eval()
    with torch.no_grad():
        expected = _outputs(model(x))
        with torch.autocast('cpu', dtype=dtype):
            actual = _outputs(model(x))
    for out, ref in zip(actual, expected):
        assert out.shape == ref.shape
        error = (out.float() - ref).abs().max() / ref.abs().max()
        assert error < TOLERANCE[dtype], (error, dtype)


@pytest.mark.parametrize('dtype', list(TOLERANCE), ids=['bf16', 'fp16'])
@pytest.mark.parametrize('name', sorted(MODELS))
def test_training_under_autocast_gives_finite_gradients(name, dtype):
    model, x = _build(name)
    model.train()
    with torch.autocast('cpu', dtype=dtype):
        outs = _outputs(model(x))
    sum(out.float().square().mean() for out in outs).backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
