"""CPUAmpOptimWrapper and the native-dtype probe (agent_mm/engine/
optim_wrapper.py)."""
import logging

import pytest
import torch
import torch.nn as nn

from agent_mm.engine import optim_wrapper
from agent_mm.engine.optim_wrapper import CPUAmpOptimWrapper, cpu_has_native


def _wrapper(**kwargs) -> CPUAmpOptimWrapper:
    model = nn.Linear(2, 2)
    return CPUAmpOptimWrapper(
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def _probes(monkeypatch, **answers):
    """Make torch.cpu's probes answer ``answers``, every other one False."""
    for probes in optim_wrapper.NATIVE_PROBES.values():
        for probe in probes:
            monkeypatch.setattr(torch.cpu, probe,
                                lambda p=probe: answers.get(p, False),
                                raising=False)


@pytest.mark.parametrize('answers, bfloat16, float16', [
    ({}, False, False),
    ({'_is_avx512_bf16_supported': True}, True, False),
    ({'_is_amx_tile_supported': True}, True, False),
    ({'_is_amx_fp16_supported': True}, False, True),
])
def test_native_dtypes_follow_the_cpu_features(monkeypatch, answers,
                                               bfloat16, float16):
    _probes(monkeypatch, **answers)
    assert cpu_has_native(torch.bfloat16) is bfloat16
    assert cpu_has_native(torch.float16) is float16


def test_a_torch_without_the_probes_has_no_native_dtype(monkeypatch):
    for probe in optim_wrapper.NATIVE_PROBES[torch.bfloat16]:
        monkeypatch.delattr(torch.cpu, probe, raising=False)
    assert not cpu_has_native(torch.bfloat16)


@pytest.mark.parametrize('native', [True, False])
@pytest.mark.parametrize('native_only', [True, False])
def test_forward_autocasts_unless_native_only_without_native(
        monkeypatch, native, native_only):
    _probes(monkeypatch, _is_amx_tile_supported=native)
    wrapper = _wrapper(native_only=native_only)
    with wrapper.optim_context(nn.Linear(2, 2)):
        enabled = torch.is_autocast_enabled('cpu')
        dtype = torch.get_autocast_dtype('cpu')
    assert enabled is (native or not native_only)
    if enabled:
        assert dtype == torch.bfloat16


def test_float32_fallback_is_logged(monkeypatch, capsys):
    _probes(monkeypatch)
    logged = []
    monkeypatch.setattr(optim_wrapper, 'print_log',
                        lambda msg, **kwargs: logged.append(msg))
    _wrapper(native_only=True)
    assert logged and 'no native bfloat16' in logged[0]


@pytest.mark.parametrize('native', [True, False])
def test_emulated_autocast_is_a_warning_that_names_the_fix(
        monkeypatch, native):
    _probes(monkeypatch, _is_amx_tile_supported=native)
    logged = []
    monkeypatch.setattr(optim_wrapper, 'print_log',
                        lambda msg, **kwargs: logged.append((msg, kwargs)))
    wrapper = _wrapper(native_only=False)
    # it autocasts either way, as asked
    assert wrapper.cast_dtype == torch.bfloat16
    if native:
        assert not logged
    else:
        ((message, kwargs), ) = logged
        assert kwargs['level'] == logging.WARNING
        assert 'no native bfloat16' in message
        assert 'emulates' in message and 'native_only=True' in message


@pytest.mark.parametrize('native', [True, False])
def test_float32_turns_autocast_off_without_a_log(monkeypatch, native):
    _probes(monkeypatch, _is_amx_tile_supported=native)
    logged = []
    monkeypatch.setattr(optim_wrapper, 'print_log',
                        lambda msg, **kwargs: logged.append(msg))
    wrapper = _wrapper(dtype='float32', native_only=True)
    with wrapper.optim_context(nn.Linear(2, 2)):
        assert not torch.is_autocast_enabled('cpu')
    assert not logged


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="got 'float64'"):
        _wrapper(dtype='float64')


def _tiny_step(dtype: str, loss_factor: float):
    """The wrapper's backward of a linear layer's loss scaled by
    ``loss_factor``: the weight's gradient divided by the loss scale (1
    unless float16), and the wrapper."""
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    wrapper = CPUAmpOptimWrapper(
        dtype=dtype, optimizer=torch.optim.SGD(model.parameters(), lr=1.))
    with wrapper.optim_context(model):
        loss = model(torch.randn(16, 8)).float().square().mean()
    wrapper.backward(loss * loss_factor)
    return model.weight.grad / wrapper.loss_scaler.get_scale(), wrapper


def test_float16_scales_the_loss_so_small_gradients_survive():
    expected, _ = _tiny_step('float32', 1e-7)
    grad, wrapper = _tiny_step('float16', 1e-7)
    assert wrapper.loss_scaler.get_scale() > 1
    # unscaled, most of these gradients are below float16's subnormals
    assert (expected.abs() < 2**-24).float().mean() > 0.5
    torch.testing.assert_close(grad, expected, rtol=2e-2, atol=1e-11)
    wrapper.step()  # unscales, steps and updates the scale
    assert wrapper.loss_scaler.get_scale() > 1


@pytest.mark.parametrize('dtype, scaled', [('float16', True),
                                           ('bfloat16', False),
                                           ('float32', False)])
def test_the_loss_scale_is_saved_and_loaded_in_float16(dtype, scaled):
    _, wrapper = _tiny_step(dtype, 1.)
    state = wrapper.state_dict()
    assert ('loss_scaler' in state) is scaled
    _, other = _tiny_step(dtype, 1.)
    other.loss_scaler.update(new_scale=2.) if scaled else None
    other.load_state_dict(state)
    assert other.loss_scaler.state_dict() == wrapper.loss_scaler.state_dict()
