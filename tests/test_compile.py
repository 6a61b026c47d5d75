"""``torch.compile`` of the agent backbones gives their eager outputs.

Inductor compiles the kernels of every graph with the C++ compiler (g++),
so the backbones here are the smallest that keep every kind of block: one
block per stage (and Swin's shifted window block). With a cold compile
cache this takes one to two minutes per backbone on 2 busy cores.
"""
import pytest
import torch

from agent_mm.models import AgentPVT, AgentSwinTransformer
from agent_mm.utils.versions import torch_before

BACKBONES = {
    'AgentPVT':
    lambda: AgentPVT(arch='tiny', depths=[1, 1, 1, 1], init_cfg=None),
    # stage 4 is shifted-window attention: its second block is shifted
    'AgentSwinTransformer':
    lambda: AgentSwinTransformer(
        arch='tiny', depths=[1, 1, 1, 2], init_cfg=None),
}


# PyTorch 2.6's inductor crashed the process (SIGFPE) in the shifted-window
# block recompiled for dynamic sizes; compiled for each size, it runs
DYNAMIC = False if torch_before('2.7') else None


def _compiled_and_eager(name, dtype):
    """Outputs of a backbone's eval forward compiled and eager, under
    autocast to ``dtype`` unless it is float32."""
    backbone = BACKBONES[name]()
    backbone.init_weights()
    backbone.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad(), torch.autocast(
            'cpu', dtype, enabled=dtype != torch.float32):
        expected = backbone(x)
        outputs = torch.compile(backbone, dynamic=DYNAMIC)(x)
    assert len(outputs) == len(expected)
    return outputs, expected


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(BACKBONES))
def test_compiled_backbone_gives_the_eager_outputs(name):
    for out, ref in zip(*_compiled_and_eager(name, torch.float32)):
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_compiled_backbone_runs_under_bfloat16_autocast():
    # the eager inference MLPs take oneDNN's fused products here; the
    # compiled graph leaves the fusions to inductor
    for out, ref in zip(*_compiled_and_eager('AgentPVT', torch.bfloat16)):
        assert out.dtype == ref.dtype
        torch.testing.assert_close(
            out.float(), ref.float(), atol=0.1, rtol=0.05)
