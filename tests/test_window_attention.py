"""ShiftWindowAttention: Swin's (shifted) window attention with padding,
rolling and partition inside, against the independent reference."""
import pytest
import torch
from reference_agent import ReferenceSwinBlock

from agent_mm.models.window_attention import ShiftWindowAttention


def _pair(shift, window_size=4, dims=12, heads=3):
    reference = ReferenceSwinBlock(dims, heads, 'B', shift, window_size, 4.,
                                   True, 9, (3, 3), (7, 7))
    module = ShiftWindowAttention(dims, heads, window_size, shift=shift)
    with torch.no_grad():
        for param in reference.attn.parameters():
            param.normal_(0, 0.5)
    module.load_state_dict(reference.attn.state_dict())
    return module, reference


# whole windows, padding on one or both sides, a map smaller than a window
@pytest.mark.parametrize('hw', [(8, 8), (9, 12), (6, 5), (3, 2)])
@pytest.mark.parametrize('shift', [0, 2])
def test_matches_the_reference_window_branch(hw, shift):
    module, reference = _pair(shift)
    x = torch.randn(2, hw[0] * hw[1], 12)
    torch.testing.assert_close(
        module(x, hw),
        reference._window_branch(x, *hw),
        atol=1e-5,
        rtol=1e-5)


def test_shift_changes_the_windows():
    unshifted, _ = _pair(0)
    shifted, _ = _pair(2)
    shifted.load_state_dict(unshifted.state_dict())
    x = torch.randn(1, 64, 12)
    assert not torch.allclose(unshifted(x, (8, 8)), shifted(x, (8, 8)))


def test_parameter_names_are_those_of_swin():
    module = ShiftWindowAttention(8, 2, 7)
    assert sorted(module.state_dict()) == [
        'proj.bias', 'proj.weight', 'qkv.bias', 'qkv.weight',
        'relative_position_bias_table', 'relative_position_index'
    ]
    assert module.relative_position_bias_table.shape == (13 * 13, 2)


@pytest.mark.parametrize('shift', [0, 2])
@pytest.mark.parametrize('batch', [1, 2])
def test_hands_sdpa_a_4d_row_major_bias(sdpa_masks, shift, batch):
    # a 3-D mask sends CPU inference to SDPA's unfused path, a head-minor
    # one makes the fused kernel read it with strides
    module, _ = _pair(shift)
    with torch.no_grad():
        module(torch.randn(batch, 64, 12), (8, 8))
    (mask, ) = sdpa_masks
    assert mask.dim() == 4
    assert mask.shape[1:] == (3, 16, 16)
    assert mask.stride(-1) == 1 and mask.stride(-2) == 16
    assert mask.stride(1) in (256, 0)
