"""Checkpoint reading under torch.load(weights_only=True), on every
scheme."""
import functools
import http.server
import os
import sys
import threading
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.runner import CheckpointLoader, load_checkpoint, save_checkpoint
from mmengine.runner.checkpoint import _load_checkpoint

import agent_mm  # noqa: F401  (registers the safe loader)
from agent_mm.utils import CheckpointError, checkpoint_io
from agent_mm.utils.checkpoint_io import SAFE_LOADERS


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


# --------------------------------------------------------------------------
# every scheme, and files that are not checkpoints


@pytest.fixture
def http_server(tmp_path, monkeypatch):
    """Serve ``tmp_path / 'served'`` on 127.0.0.1 (stopped after the test);
    yields the base URL. Downloads are cached under ``tmp_path / 'torch'``."""
    served = tmp_path / 'served'
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    try:
        yield served, f'http://127.0.0.1:{server.server_port}'
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):

    def log_message(self, *args):
        pass


def _hostile(path, marker):
    torch.save({'state_dict': {'w': torch.zeros(2)},
                'payload': _RunsCode(str(marker))}, str(path))


# scheme -> (table function patched in agent_mm's loader, name in the table)
URL_SCHEMES = {
    'http': (None, None),
    'torchvision://': ('get_torchvision_models', 'resnet50'),
    'modelzoo://': ('get_torchvision_models', 'resnet50'),
    'open-mmlab://': ('get_external_models', 'resnext50_32x4d'),
    'openmmlab://': ('get_external_models', 'resnext50_32x4d'),
    'mmcls://': ('get_mmcls_models', 'resnet50'),
}


def _checkpoint_name(scheme, url, monkeypatch):
    table, name = URL_SCHEMES[scheme]
    if table is None:
        return url
    monkeypatch.setattr(checkpoint_io, table, lambda: {name: url})
    return scheme + name


@pytest.mark.parametrize('scheme', sorted(URL_SCHEMES))
def test_hostile_checkpoint_from_a_url_is_refused_not_run(
        http_server, tmp_path, monkeypatch, scheme):
    served, base = http_server
    marker = tmp_path / 'code_was_executed'
    _hostile(served / 'evil.pth', marker)
    name = _checkpoint_name(scheme, f'{base}/evil.pth', monkeypatch)

    with pytest.raises(CheckpointError, match='Refused to load'):
        CheckpointLoader.load_checkpoint(name, map_location='cpu')

    assert not marker.exists()
    cached = tmp_path / 'torch' / 'hub' / 'checkpoints' / 'evil.pth'
    assert not cached.exists()  # removed, so a retry downloads again


def test_hostile_pretrained_url_in_init_cfg_is_refused(http_server,
                                                       tmp_path):
    from agent_mm.models import AgentPVT
    served, base = http_server
    marker = tmp_path / 'code_was_executed'
    _hostile(served / 'agent_pvt_t.pth', marker)
    model = AgentPVT(depths=[1, 1, 1, 1], init_cfg=dict(
        type='Pretrained', checkpoint=f'{base}/agent_pvt_t.pth'))
    with pytest.raises(CheckpointError, match='Refused to load'):
        model.init_weights()
    assert not marker.exists()


def test_checkpoint_from_a_url_loads_and_is_cached(http_server, tmp_path):
    served, base = http_server
    model = torch.nn.Linear(3, 2)
    torch.save({'state_dict': model.state_dict()}, str(served / 'lin.pth'))

    other = torch.nn.Linear(3, 2)
    load_checkpoint(other, f'{base}/lin.pth', map_location='cpu')

    torch.testing.assert_close(other.weight, model.weight)
    cached = tmp_path / 'torch' / 'hub' / 'checkpoints' / 'lin.pth'
    assert cached.read_bytes() == (served / 'lin.pth').read_bytes()


def test_html_error_page_from_a_url_is_not_a_checkpoint(http_server):
    served, base = http_server
    (served / 'gone.pth').write_text(
        '<!DOCTYPE html><html><body>Access denied</body></html>')
    with pytest.raises(CheckpointError, match='is not a PyTorch checkpoint'):
        CheckpointLoader.load_checkpoint(f'{base}/gone.pth')


def test_hostile_checkpoint_from_an_object_store_is_refused(
        tmp_path, monkeypatch):
    marker = tmp_path / 'code_was_executed'
    _hostile(tmp_path / 'evil.pth', marker)
    data = (tmp_path / 'evil.pth').read_bytes()
    store = types.SimpleNamespace(get=lambda path: data)
    monkeypatch.setattr(checkpoint_io, 'get_file_backend',
                        lambda path, backend_args: store)
    for name in ('s3://bucket/evil.pth', 'petrel://bucket/evil.pth',
                 'cluster:s3://bucket/evil.pth'):
        with pytest.raises(CheckpointError, match='Refused to load'):
            CheckpointLoader.load_checkpoint(name)
    assert not marker.exists()


def test_hostile_checkpoint_from_pavi_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / 'code_was_executed'
    _hostile(tmp_path / 'evil.pth', marker)
    data = (tmp_path / 'evil.pth').read_bytes()

    class _Model:
        name = 'evil.pth'

        @staticmethod
        def download(path):
            with open(path, 'wb') as f:
                f.write(data)

    pavi = types.ModuleType('pavi')
    pavi.modelcloud = types.SimpleNamespace(get=lambda path: _Model)
    monkeypatch.setitem(sys.modules, 'pavi', pavi)
    with pytest.raises(CheckpointError, match='Refused to load'):
        CheckpointLoader.load_checkpoint('pavi://models/evil.pth')
    assert not marker.exists()


def test_every_registered_scheme_reads_through_the_safe_loader():
    safe = set(SAFE_LOADERS)
    unsafe = {prefix: loader.__module__
              for prefix, loader in CheckpointLoader._schemes.items()
              if loader not in safe}
    assert not unsafe
    assert {p for prefixes in SAFE_LOADERS.values()
            for p in prefixes} == set(CheckpointLoader._schemes)


@pytest.mark.parametrize('content', [
    b'state_dict = {"w": 1}\n',
    bytes(range(256)) * 8,
    b'<html><head><title>404 Not Found</title></head></html>',
    b'',
], ids=['text', 'random-bytes', 'html', 'empty'])
def test_file_that_is_not_a_checkpoint_says_so(tmp_path, content):
    path = tmp_path / 'model.pth'
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match='is not a PyTorch checkpoint'):
        _load_checkpoint(str(path), map_location='cpu')


def test_missing_file_under_data_hints_at_the_authors_checkpoints(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="authors' checkpoints"):
        _load_checkpoint('data/agent_pvt_t_max_acc.pth')
    with pytest.raises(FileNotFoundError) as info:
        _load_checkpoint('work_dirs/run/epoch_2.pth')
    assert 'authors' not in str(info.value)
