"""CPU feature probes: torch's answer, and no where torch lacks the probe."""
import torch

from agent_mm.utils.cpu_features import cpu_supports


def test_a_probe_gives_torchs_answer(monkeypatch):
    for answer in (True, False):
        monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported',
                            lambda answer=answer: answer, raising=False)
        assert cpu_supports('_is_amx_tile_supported') is answer


def test_a_probe_missing_from_torch_answers_no():
    assert not hasattr(torch.cpu, '_is_no_such_unit_supported')
    assert cpu_supports('_is_no_such_unit_supported') is False
