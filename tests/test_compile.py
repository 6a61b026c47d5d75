"""``torch.compile`` of the agent backbones gives their eager outputs.

Inductor compiles the kernels of every graph with the C++ compiler (g++),
so the backbones here are the smallest that keep every kind of block: one
block per stage (and Swin's shifted window block). With a cold compile
cache this takes one to two minutes per backbone on 2 busy cores.
"""
import pytest
import torch

from agent_mm.models import AgentPVT, AgentSwinTransformer

BACKBONES = {
    'AgentPVT':
    lambda: AgentPVT(arch='tiny', depths=[1, 1, 1, 1], init_cfg=None),
    # stage 4 is shifted-window attention: its second block is shifted
    'AgentSwinTransformer':
    lambda: AgentSwinTransformer(
        arch='tiny', depths=[1, 1, 1, 2], init_cfg=None),
}


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(BACKBONES))
def test_compiled_backbone_gives_the_eager_outputs(name):
    backbone = BACKBONES[name]()
    backbone.init_weights()
    backbone.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = backbone(x)
        outputs = torch.compile(backbone)(x)
    assert len(outputs) == len(expected)
    for out, ref in zip(outputs, expected):
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
