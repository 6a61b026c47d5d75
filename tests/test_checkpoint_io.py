"""Checkpoint reading under torch.load(weights_only=True)."""
import os
from collections import OrderedDict

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.runner import load_checkpoint, save_checkpoint
from mmengine.runner.checkpoint import _load_checkpoint

import agent_mm  # noqa: F401  (registers the safe loader)
from agent_mm.utils import CheckpointError


def _message_hub_state() -> dict:
    hub = MessageHub(name='test_checkpoint_io_hub')
    for step in range(5):
        hub.update_scalar('train/loss', 1.0 / (step + 1))
    hub.update_info('iter', 5)
    return hub.state_dict()


def test_mmengine_checkpoint_with_numpy_meta_and_message_hub_loads(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = str(tmp_path / 'iter_5.pth')
    meta = dict(
        seed=np.int64(7),
        anchors=np.arange(6, dtype=np.float32).reshape(2, 3),
        message_hub=_message_hub_state())
    save_checkpoint({'state_dict': model.state_dict(), 'meta': meta}, path)

    other = torch.nn.Linear(3, 2)
    checkpoint = load_checkpoint(other, path, map_location='cpu')

    for key, value in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value)
    assert checkpoint['meta']['seed'] == 7
    np.testing.assert_array_equal(checkpoint['meta']['anchors'],
                                  meta['anchors'])
    buffer = checkpoint['meta']['message_hub']['log_scalars']['train/loss']
    assert isinstance(buffer, HistoryBuffer)
    np.testing.assert_allclose(buffer.data[0], [1, 1 / 2, 1 / 3, 1 / 4, 1 / 5])
    assert buffer.mean() == pytest.approx(np.mean(buffer.data[0]))


class _RunsCode:
    """Unpickling this object would create a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker, )


def test_checkpoint_with_pickled_callable_is_refused(tmp_path):
    marker = tmp_path / 'code_was_executed'
    path = str(tmp_path / 'evil.pth')
    torch.save({'state_dict': {}, 'payload': _RunsCode(str(marker))}, path)

    with pytest.raises(CheckpointError, match='Refused to load') as info:
        _load_checkpoint(path, map_location='cpu')

    assert 'weights_only=True' in str(info.value)
    assert path in str(info.value)
    assert not marker.exists()


def test_missing_checkpoint_names_the_path(tmp_path):
    path = str(tmp_path / 'nowhere.pth')
    with pytest.raises(FileNotFoundError, match='nowhere.pth'):
        _load_checkpoint(path, map_location='cpu')


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / 'truncated.pth'
    torch.save({'state_dict': {'w': torch.zeros(1000)}}, str(path))
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match='truncated'):
        _load_checkpoint(str(path), map_location='cpu')


def test_authors_yacs_config_loads_without_yacs(tmp_path, yacs_cfgnode):
    config = yacs_cfgnode(MODEL=yacs_cfgnode(TYPE='agent_pvt_tiny'),
                          EPOCHS=300)
    path = str(tmp_path / 'agent_pvt_t_max_acc.pth')
    with yacs_cfgnode.importable():
        torch.save({'model': {'w': torch.ones(2)}, 'config': config,
                    'max_accuracy': 79.4, 'epoch': 299}, path)

    checkpoint = _load_checkpoint(path, map_location='cpu')

    assert isinstance(checkpoint['config'], OrderedDict)
    assert checkpoint['config']['MODEL']['TYPE'] == 'agent_pvt_tiny'
    torch.testing.assert_close(checkpoint['model']['w'], torch.ones(2))
