"""ONNX export: agent attention's branch for traced graphs, and the backbones
and the quick-start segmentor exported from their configs, equal in ONNX
Runtime.

The tests that run ONNX Runtime skip only when the deploy extra (onnx,
onnxscript, onnxruntime) is not installed; ``make install`` installs it.
"""
import importlib.util
import os.path as osp

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config

from agent_mm.deploy import build_export_model, check_onnx, export_onnx
from agent_mm.deploy import onnx as deploy_onnx
from agent_mm.deploy.onnx import DYNAMIC_EXPORT_TORCH, require_dynamic_export
from agent_mm.models import AgentAttention
from agent_mm.models.bias_maps import pooling_matrix
from agent_mm.models.layers import split_heads
from agent_mm.models.traced_agent_attention import traced_agent_attention
from agent_mm.utils.versions import torch_before

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
MISSING = [
    name for name in ('onnx', 'onnxscript', 'onnxruntime')
    if importlib.util.find_spec(name) is None
]
needs_deploy = pytest.mark.skipif(
    bool(MISSING),
    reason=f'the deploy extra is not installed (no {", ".join(MISSING)}): '
    "pip install -e '.[deploy]'")
# PyTorch 2.6 cannot export dynamic sizes: the tool says so instead
# (test_dynamic_export_is_refused_before_torch_2_7)
exports_dynamic_sizes = pytest.mark.skipif(
    torch_before(DYNAMIC_EXPORT_TORCH),
    reason=f'torch {torch.__version__} cannot export dynamic sizes')


class TokenMap(torch.nn.Module):
    """Agent attention on a ``(B, C, H, W)`` map, for export."""

    def __init__(self, attn: AgentAttention):
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x.flatten(2).transpose(1, 2), x.shape[-2:])


def _attention() -> TokenMap:
    # more agents (12x12) than tokens at the smallest size below
    return TokenMap(
        AgentAttention(32, 2, (14, 14), agent_num=9,
                       agent_shape=(12, 12))).eval()


@pytest.mark.parametrize('hw', [(9, 7), (20, 33)])
def test_traced_branch_equals_the_fast_path(hw):
    attn = _attention().attn
    x = torch.randn(2, hw[0] * hw[1], 32)
    heads = [
        split_heads(t, attn.num_heads)
        for t in (*attn._project(x), torch.randn(2, 144, 32))
    ]
    with torch.no_grad():
        torch.testing.assert_close(
            traced_agent_attention(attn, *heads, hw),
            attn.fast_attention(*heads, hw),
            atol=1e-5,
            rtol=1e-5)


def test_tracing_leaves_no_tensor_of_the_trace_in_a_cache():
    model = _attention()
    x = torch.randn(1, 32, 10, 6)
    with torch.no_grad():
        before = model(x)
    pooling_matrix.cache_clear()
    model.attn.bias_cache.clear()
    dims = torch.export.Dim.DYNAMIC
    torch.export.export(
        model, (x, ), dynamic_shapes=({2: dims, 3: dims}, ), strict=False)
    assert pooling_matrix.cache_info().currsize == 0
    assert len(model.attn.bias_cache) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


def _legacy_export(model: torch.nn.Module, x: torch.Tensor, path: str):
    torch.onnx.export(
        model, (x, ),
        path,
        dynamo=False,
        input_names=['input'],
        dynamic_axes={'input': {
            0: 'batch',
            2: 'height',
            3: 'width'
        }})


@needs_deploy
@pytest.mark.parametrize('exporter', [
    pytest.param('dynamo', marks=exports_dynamic_sizes), 'legacy'])
def test_agent_attention_exports_with_dynamic_sizes(exporter, tmp_path):
    model, path = _attention(), str(tmp_path / 'attn.onnx')
    x = torch.randn(1, 32, 16, 12)
    if exporter == 'dynamo':
        export_onnx(model, x, path, dynamic=True)
    else:
        _legacy_export(model, x, path)
    for shape in [(1, 32, 16, 12), (1, 32, 9, 7), (1, 32, 20, 33)]:
        assert check_onnx(model, path, torch.randn(shape)).ok


@pytest.mark.slow
@needs_deploy
@pytest.mark.parametrize('config, shape', [
    ('agent_pvt/retinanet_agent-pvt-t_fpn_1x_coco.py', (128, 128)),
    ('agent_swin/mask-rcnn_agent-swin-t_fpn_ms-crop-1x_coco.py', (96, 160)),
])
def test_backbone_of_the_default_config_exports(config, shape, tmp_path):
    with pytest.warns(UserWarning, match='randomly initialised'):
        model = build_export_model(
            Config.fromfile(osp.join(REPO, 'configs', config)))
    path = str(tmp_path / 'backbone.onnx')
    x = torch.randn(1, 3, *shape)
    assert export_onnx(model, x, path) == ['out0', 'out1', 'out2', 'out3']
    check = check_onnx(model, path, x)
    assert check.ok, check


def _tool():
    """tools/deployment/pytorch2onnx.py as a module."""
    path = osp.join(REPO, 'tools', 'deployment', 'pytorch2onnx.py')
    spec = importlib.util.spec_from_file_location('pytorch2onnx', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The dynamic export takes about three times as long as the static one: it
# exports one block per stage (each kind of block; the static export has
# them all).
@pytest.mark.slow
@needs_deploy
@pytest.mark.parametrize(
    'dynamic', [False, pytest.param(True, marks=exports_dynamic_sizes)])
def test_tool_exports_the_quickstart_segmentor(dynamic, tmp_path, capsys):
    config = osp.join(REPO, 'configs', 'quickstart',
                      'fpn_agent-pvt-t_shapes.py')
    # the tool creates the missing directory
    out = str(tmp_path / 'new' / 'fpn.onnx')
    args = [config, '--shape', '128', '128', '--out', out, '--repeats', '2']
    if dynamic:
        args += [
            '--dynamic', '--cfg-options', 'model.backbone.depths=[1,1,1,1]'
        ]
    with pytest.warns(UserWarning, match='No checkpoint given'):
        status = _tool().main(args)
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert 'SegmentorLogits -> logits' in printed
    assert f'dynamic H, W: {"yes" if dynamic else "no"}' in printed
    # at 128x128, and with dynamic sizes at a larger size too
    assert printed.count(' ok\n') == 1 + dynamic
    assert 'ORT/eager' in printed
    # the file only, no temporary left beside it
    assert sorted(p.name for p in (tmp_path / 'new').iterdir()) == [
        'fpn.onnx'
    ]


@needs_deploy
def test_tool_reports_a_graph_that_cannot_run_at_a_size(tmp_path, capsys):
    model, path = _attention(), str(tmp_path / 'static.onnx')
    export_onnx(model, torch.randn(1, 32, 16, 12), path)
    assert not _tool().report(model, path, torch.randn(1, 32, 9, 7), 0)
    assert 'input 1x32x9x7: FAILED, ONNX Runtime cannot run the graph' in (
        capsys.readouterr().out)


SEGMENTOR = osp.join(REPO, 'configs', 'quickstart',
                     'fpn_agent-pvt-t_shapes.py')


def _no_export(*args, **kwargs):
    raise AssertionError('went on to build or export')


def test_a_missing_checkpoint_is_an_error_before_the_model_is_built(
        monkeypatch):
    monkeypatch.setattr(deploy_onnx, 'init_default_scope', _no_export)
    with pytest.raises(FileNotFoundError, match="'missing.pth' not found"):
        build_export_model(Config.fromfile(SEGMENTOR), 'missing.pth')


@pytest.fixture
def tool_without_export(monkeypatch):
    """The tool, failing the test if it builds a model or exports."""
    tool = _tool()
    monkeypatch.setattr(tool, 'build_export_model', _no_export)
    monkeypatch.setattr(tool, 'export_onnx', _no_export)
    return tool


def test_tool_stops_on_a_missing_checkpoint(tool_without_export, tmp_path,
                                            capsys):
    checkpoint, out = str(tmp_path / 'x.pth'), tmp_path / 'x.onnx'
    with pytest.raises(SystemExit) as exit_:
        tool_without_export.main(
            [SEGMENTOR, checkpoint, '--shape', '64', '64', '--out',
             str(out)])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert f'checkpoint {checkpoint!r} not found' in error
    assert 'omit the checkpoint' in error
    assert not out.exists()


@pytest.mark.parametrize('out', ['file/x.onnx', 'dir', 'dir/'])
def test_tool_stops_on_an_unusable_out(out, tool_without_export, tmp_path,
                                       capsys):
    (tmp_path / 'file').write_text('not a directory')
    (tmp_path / 'dir').mkdir()
    path = str(tmp_path / out)
    with pytest.raises(SystemExit) as exit_:
        tool_without_export.main(
            [SEGMENTOR, '--shape', '64', '64', '--out', path])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert '--out: ' in error and repr(path) in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ['dir', 'file']
    assert not any((tmp_path / 'dir').iterdir())


@pytest.mark.parametrize('option, message', [
    (['--shape', '0', '64'], '--shape must be positive, got 0 64'),
    (['--threads', '0'], '--threads must be positive, got 0'),
    (['--repeats', '-1'], '--repeats must be 0 (no timing) or more, got -1'),
])
def test_tool_stops_on_a_bad_number(option, message, tool_without_export,
                                    tmp_path, capsys):
    out = tmp_path / 'new' / 'x.onnx'
    args = [SEGMENTOR, '--shape', '64', '64', '--out', str(out), *option]
    with pytest.raises(SystemExit) as exit_:
        tool_without_export.main(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_tool_stops_on_dynamic_sizes_that_this_torch_cannot_export(
        tool_without_export, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch, '__version__', '2.6.0+cu124')
    out = tmp_path / 'new' / 'x.onnx'
    with pytest.raises(SystemExit) as exit_:
        tool_without_export.main(
            [SEGMENTOR, '--shape', '64', '64', '--dynamic', '--out', str(out)])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert 'exporting dynamic sizes needs torch >= 2.7.0' in error
    assert 'torch 2.6.0+cu124' in error and 'without --dynamic' in error
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize('version, refused', [('2.6.0', True),
                                              ('2.7.1+cu126', False),
                                              ('2.13.0+cpu', False)])
def test_dynamic_export_is_refused_before_torch_2_7(monkeypatch, version,
                                                    refused):
    monkeypatch.setattr(torch, '__version__', version)
    if refused:
        with pytest.raises(RuntimeError, match='needs torch >= 2.7.0'):
            require_dynamic_export()
    else:
        require_dynamic_export()


@pytest.mark.parametrize('version, fused', [('2.6.0+cu124', True),
                                            ('2.7.1+cu126', False)])
def test_segmentor_batch_norms_are_fused_where_torch_cannot_export_them(
        monkeypatch, version, fused):
    monkeypatch.setattr(torch, '__version__', version)
    with pytest.warns(UserWarning, match='No checkpoint given'):
        model = build_export_model(Config.fromfile(SEGMENTOR))
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bool(norms) is not fused


def test_tool_stops_on_a_missing_config(tool_without_export, tmp_path,
                                        capsys):
    config, out = str(tmp_path / 'nowhere.py'), tmp_path / 'new' / 'x.onnx'
    with pytest.raises(SystemExit) as exit_:
        tool_without_export.main([config, '--shape', '64', '64', '--out',
                                  str(out)])
    assert exit_.value.code == 2
    assert f'config {config!r} is not a file' in capsys.readouterr().err
    # the checks create nothing, not even the output's directory
    assert not any(tmp_path.iterdir())


@needs_deploy
def test_a_failed_save_leaves_no_partial_file(monkeypatch, tmp_path):
    def save(self, destination, **kwargs):
        with open(destination, 'wb') as file:
            file.write(b'partial')
        raise OSError('disk full')

    monkeypatch.setattr(torch.onnx.ONNXProgram, 'save', save)
    path = tmp_path / 'attn.onnx'
    path.write_bytes(b'earlier export')
    with pytest.raises(OSError, match='disk full'):
        export_onnx(_attention(), torch.randn(1, 32, 8, 8), str(path))
    # the earlier file is untouched and no temporary is left
    assert path.read_bytes() == b'earlier export'
    assert [p.name for p in tmp_path.iterdir()] == ['attn.onnx']


@needs_deploy
def test_the_compared_session_does_not_spin(monkeypatch, tmp_path, capsys):
    model, path = _attention(), str(tmp_path / 'attn.onnx')
    export_onnx(model, torch.randn(1, 32, 8, 8), path)
    sessions = []

    def recorded(*args, **kwargs):
        sessions.append(ort_session(*args, **kwargs))
        return sessions[-1]

    ort_session = deploy_onnx.ort_session
    monkeypatch.setattr(deploy_onnx, 'ort_session', recorded)
    assert _tool().report(model, path, torch.randn(1, 32, 8, 8), 2)
    assert 'ORT/eager' in capsys.readouterr().out
    options = sessions[0].get_session_options()
    assert options.get_session_config_entry(
        'session.intra_op.allow_spinning') == '0'
