"""tools/train.py and tools/test.py: options, resume, mixed precision."""
import os
import os.path as osp
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from mmengine.config import Config
from tiny_configs import DET_CONFIG, DET_OVERRIDES, tiny_config

import agent_mm  # noqa: F401  (reads mmengine checkpoints safely)
from agent_mm.engine import runtime

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(REPO, 'tools'))
import test as test_tool  # noqa: E402
import train as train_tool  # noqa: E402

QUICKSTART_SEG = osp.join(REPO, 'configs', 'quickstart',
                          'fpn_agent-pvt-t_shapes.py')
QUICKSTART_DET = osp.join(REPO, 'configs', 'quickstart',
                          'mask-rcnn_agent-pvt-t_fpn_shapes.py')

# deterministic: fixed seed, no random augmentation, no dropout/drop path
DETERMINISTIC_SEG = '''
_base_ = {base!r}
data_root = {data_root!r}
generate = dict(num_train=8, num_val=2, img_size=64, seed=2)
randomness = dict(seed=0, deterministic=True)
model = dict(
    data_preprocessor=dict(size=(64, 64)),
    backbone=dict(drop_path_rate=0.),
    decode_head=dict(dropout_ratio=0.))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs')
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, generate=generate,
                 pipeline=train_pipeline))
val_dataloader = dict(
    num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, generate=generate))
test_dataloader = val_dataloader
train_cfg = dict(max_iters=4, val_interval=100)
default_hooks = dict(checkpoint=dict(interval=2))
'''


def _write_config(tmp_path, text=DETERMINISTIC_SEG, base=QUICKSTART_SEG):
    path = tmp_path / 'tiny.py'
    path.write_text(
        text.format(base=base, data_root=str(tmp_path / 'shapes') + '/'))
    return str(path)


def _train(config, work_dir, *args):
    result = subprocess.run(
        [sys.executable,
         osp.join(REPO, 'tools', 'train.py'), config, '--work-dir',
         str(work_dir), *args],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


@pytest.mark.parametrize('accelerator, wrapper', [
    (True, 'AmpOptimWrapper'), (False, 'CPUAmpOptimWrapper')])
def test_amp_keeps_only_the_chosen_wrappers_options(monkeypatch, accelerator,
                                                    wrapper):
    # the seg quick-start's CPU wrapper has native_only, mmengine's has not
    monkeypatch.setattr(runtime, 'has_accelerator', lambda: accelerator)
    float32 = Config.fromfile(QUICKSTART_SEG)
    cfg = train_tool.build_config(
        train_tool.parse_args([QUICKSTART_SEG, '--amp']))
    assert cfg.optim_wrapper.type == wrapper
    assert ('native_only' in cfg.optim_wrapper) is not accelerator
    assert ('loss_scale' in cfg.optim_wrapper) is accelerator
    # a segmentor autocasts its whole forward: no hook added
    assert cfg.get('custom_hooks', []) == float32.get('custom_hooks', [])


def test_cpu_amp_keeps_a_detectors_own_feature_hook(monkeypatch):
    # its hook (native_only, with heads) already sets the precision; the
    # whole-model wrapper would hand NMS bfloat16 where the hook declines
    monkeypatch.setattr(runtime, 'has_accelerator', lambda: False)
    float32 = Config.fromfile(QUICKSTART_DET)
    cfg = train_tool.build_config(
        train_tool.parse_args([QUICKSTART_DET, '--amp']))
    assert cfg.optim_wrapper == float32.optim_wrapper
    assert cfg.custom_hooks == float32.custom_hooks


def test_cpu_amp_gives_a_detector_without_a_hook_bfloat16_features(
        monkeypatch):
    monkeypatch.setattr(runtime, 'has_accelerator', lambda: False)
    cfg = train_tool.build_config(
        train_tool.parse_args(
            [QUICKSTART_DET, '--amp', '--cfg-options', 'custom_hooks=[]']))
    assert cfg.optim_wrapper.type == 'OptimWrapper'
    assert cfg.custom_hooks == [
        dict(type='FeatureAutocastHook', dtype='bfloat16')
    ]


def test_amp_on_a_gpu_autocasts_a_detectors_whole_forward(monkeypatch):
    monkeypatch.setattr(runtime, 'has_accelerator', lambda: True)
    cfg = train_tool.build_config(
        train_tool.parse_args([QUICKSTART_DET, '--amp']))
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert cfg.optim_wrapper.loss_scale == 'dynamic'


def test_test_tool_amp_overrides_a_detectors_own_feature_hook(monkeypatch):
    # the config's hook may decline (native_only); --amp asks for bfloat16
    monkeypatch.setattr(test_tool, 'has_accelerator', lambda: False)
    float32 = Config.fromfile(QUICKSTART_DET)
    cfg = test_tool.build_config(
        test_tool.parse_args([QUICKSTART_DET, 'x.pth', '--amp']))
    assert cfg.custom_hooks == [
        *float32.custom_hooks,
        dict(type='FeatureAutocastHook', dtype='bfloat16')
    ]


def test_resume_options():
    cfg = train_tool.build_config(
        train_tool.parse_args([QUICKSTART_DET, '--resume']))
    assert cfg.resume is True and cfg.load_from is None
    cfg = train_tool.build_config(
        train_tool.parse_args([QUICKSTART_DET, '--resume', 'x.pth']))
    assert cfg.resume is True and cfg.load_from == 'x.pth'


@pytest.mark.parametrize('tool', [train_tool, test_tool])
def test_cfg_options_can_add_custom_imports(tmp_path, monkeypatch, tool):
    # Config.fromfile imports the file's custom_imports before the command
    # line is merged: a module added there must be imported all the same
    name = f'module_of_{tool.__name__}_options'
    (tmp_path / f'{name}.py').write_text('')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    tool.build_config(
        tool.parse_args([
            QUICKSTART_DET, *(['ckpt.pth'] if tool is test_tool else []),
            '--cfg-options', f"custom_imports.imports=['agent_mm','{name}']"
        ]))
    assert name in sys.modules


def test_cfg_options_naming_a_missing_module_fail():
    options = {'custom_imports.imports': ['agent_mm', 'no_such_module_x']}
    with pytest.raises(ImportError, match='no_such_module_x'):
        runtime.config_from_file(QUICKSTART_DET, options)


SLURM = dict(SLURM_PROCID='3', SLURM_NTASKS='8', SLURM_LOCALID='1',
             SLURM_NODELIST='node[7-8]')
MPI = dict(OMPI_COMM_WORLD_RANK='3', OMPI_COMM_WORLD_SIZE='8',
           OMPI_COMM_WORLD_LOCAL_RANK='1', MASTER_ADDR='10.0.0.1')
RANKS = dict(RANK='3', WORLD_SIZE='8', LOCAL_RANK='1')


def test_launcher_env_from_slurm(monkeypatch):
    calls = []

    def scontrol(command, **kwargs):
        calls.append(command)
        return SimpleNamespace(stdout='node7\nnode8\n')

    monkeypatch.setattr(runtime.subprocess, 'run', scontrol)
    assert runtime.launcher_env('slurm', SLURM) == dict(
        RANKS, MASTER_ADDR='node7', MASTER_PORT='29500')
    assert calls == [['scontrol', 'show', 'hostnames', 'node[7-8]']]
    # an address and port set by the user are kept, scontrol is not asked
    assert runtime.launcher_env(
        'slurm', dict(SLURM, MASTER_ADDR='10.0.0.2', MASTER_PORT='1234')) == (
            dict(RANKS, MASTER_ADDR='10.0.0.2', MASTER_PORT='1234'))
    assert len(calls) == 1


def test_launcher_env_from_mpi():
    assert runtime.launcher_env('mpi', MPI) == dict(
        RANKS, MASTER_ADDR='10.0.0.1', MASTER_PORT='29500')


@pytest.mark.parametrize('launcher, environ, message', [
    ('slurm', dict(SLURM, SLURM_PROCID=None), 'needs SLURM_PROCID in the '
     'environment: start the processes with srun'),
    ('mpi', dict(MPI, OMPI_COMM_WORLD_SIZE=None), 'needs '
     'OMPI_COMM_WORLD_SIZE in the environment: start the processes with '
     'mpirun'),
    ('mpi', dict(MPI, MASTER_ADDR=None), 'needs MASTER_ADDR'),
    ('slurm', SLURM, 'set MASTER_ADDR'),  # no scontrol to expand the list
])
def test_launcher_env_names_what_is_missing(monkeypatch, launcher, environ,
                                            message):
    def no_scontrol(*args, **kwargs):
        raise FileNotFoundError(2, 'No such file or directory', 'scontrol')

    monkeypatch.setattr(runtime.subprocess, 'run', no_scontrol)
    environ = {k: v for k, v in environ.items() if v is not None}
    with pytest.raises(RuntimeError, match=message):
        runtime.launcher_env(launcher, environ)


@pytest.mark.parametrize('script, arguments', [
    ('dist_train.sh', 2), ('dist_test.sh', 3), ('slurm_train.sh', 4),
    ('slurm_test.sh', 4)])
def test_launch_scripts_print_their_usage_when_arguments_are_missing(
        script, arguments):
    result = subprocess.run(
        ['bash', osp.join(REPO, 'tools', script), *['x'] * (arguments - 1)],
        capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith(f'usage: tools/{script} ')


@pytest.mark.parametrize('gres, expected', [
    (None, '--gres=gpu:8'), ('', None), ('gpu:a100:4', '--gres=gpu:a100:4')])
def test_slurm_script_requests_gpus_unless_gres_is_empty(tmp_path, gres,
                                                         expected):
    # a stand-in srun that prints the options it was given
    srun = tmp_path / 'srun'
    srun.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    srun.chmod(0o755)
    env = dict(os.environ, PATH=f'{tmp_path}{os.pathsep}{os.environ["PATH"]}')
    if gres is not None:
        env['GRES'] = gres
    result = subprocess.run(
        ['bash', osp.join(REPO, 'tools', 'slurm_train.sh'), 'cpu', 'job',
         'config.py', 'work'], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    options = result.stdout.split('\n')
    assert [o for o in options if o.startswith('--gres')] == (
        [expected] if expected else [])
    assert '--launcher=slurm' in options


def test_auto_scale_lr_needs_base_batch_size(tmp_path):
    config = tmp_path / 'no_scale.py'
    config.write_text(f'_base_ = {QUICKSTART_DET!r}\n'
                      'auto_scale_lr = None\n')
    with pytest.raises(ValueError, match='base_batch_size'):
        train_tool.build_config(
            train_tool.parse_args([str(config), '--auto-scale-lr']))


def test_sync_bn_becomes_bn_on_cpu(tmp_path):
    config = tmp_path / 'syncbn.py'
    config.write_text(
        f'_base_ = {QUICKSTART_SEG!r}\n'
        "model = dict(decode_head=dict(norm_cfg=dict(type='SyncBN')))\n")
    cfg = train_tool.build_config(train_tool.parse_args([str(config)]))
    if not torch.cuda.is_available():
        assert cfg.model.decode_head.norm_cfg.type == 'BN'


def test_test_tool_refuses_an_out_file_it_cannot_write(capsys):
    with pytest.raises(SystemExit) as exit_:
        test_tool.parse_args([QUICKSTART_DET, 'x.pth', '--out', 'r.json'])
    assert exit_.value.code == 2
    assert "--out must name a .pkl or .pickle file, got 'r.json'" in (
        capsys.readouterr().err)


def test_test_tool_turns_on_visualisation(tmp_path):
    cfg = test_tool.build_config(
        test_tool.parse_args([QUICKSTART_DET, 'ckpt.pth', '--show-dir',
                              'vis', '--work-dir', str(tmp_path)]))
    assert cfg.load_from == 'ckpt.pth'
    assert cfg.default_hooks.visualization.draw is True
    assert cfg.default_hooks.visualization.test_out_dir == 'vis'


def test_test_tool_keeps_freed_memory_before_testing(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(test_tool, 'keep_freed_memory',
                        lambda: calls.append('kept'))
    runner = SimpleNamespace(test=lambda: calls.append('tested') or {})
    monkeypatch.setattr(test_tool, 'build_runner', lambda cfg: runner)
    test_tool.main([QUICKSTART_DET, 'ckpt.pth', '--work-dir', str(tmp_path)])
    assert calls == ['kept', 'tested']


def test_train_tool_keeps_freed_memory_before_training(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train_tool, 'keep_freed_memory',
                        lambda: calls.append('kept'))
    runner = SimpleNamespace(register_hook=lambda hook: None,
                             train=lambda: calls.append('trained'))
    monkeypatch.setattr(train_tool, 'build_runner',
                        lambda cfg: calls.append('built') or runner)
    train_tool.main([QUICKSTART_SEG, '--work-dir', str(tmp_path)])
    assert calls == ['kept', 'built', 'trained']


@pytest.mark.slow
def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path):
    config = _write_config(tmp_path)
    _train(config, tmp_path / 'straight')
    _train(config, tmp_path / 'split', '--cfg-options',
           'train_cfg.max_iters=2')
    assert not (tmp_path / 'split' / 'iter_4.pth').exists()
    out = _train(config, tmp_path / 'split', '--resume')
    assert 'resumed epoch: 0, iter: 2' in out

    straight = torch.load(tmp_path / 'straight' / 'iter_4.pth')
    resumed = torch.load(tmp_path / 'split' / 'iter_4.pth')
    initial = torch.load(tmp_path / 'straight' / 'iter_2.pth')
    assert straight['meta']['iter'] == resumed['meta']['iter'] == 4
    moved = False
    for key, value in straight['state_dict'].items():
        torch.testing.assert_close(resumed['state_dict'][key], value,
                                   msg=key)
        moved |= not torch.equal(initial['state_dict'][key], value)
    assert moved, 'the last two iterations changed no weight'


@pytest.mark.slow
def test_amp_training_on_cpu_stays_finite(tmp_path):
    # from float32, so that the wrapper below is the one --amp chose
    float32 = DETERMINISTIC_SEG + "optim_wrapper = dict(type='OptimWrapper')\n"
    config = _write_config(tmp_path, float32)
    out = _train(config, tmp_path / 'amp', '--amp', '--cfg-options',
                 'train_cfg.max_iters=2', 'default_hooks.logger.interval=1')
    expected = ('AmpOptimWrapper'
                if torch.cuda.is_available() else 'CPUAmpOptimWrapper')
    dumped = Config.fromfile(str(tmp_path / 'amp' / 'tiny.py'))
    assert dumped.optim_wrapper.type == expected
    _assert_finite_training(out, tmp_path / 'amp' / 'iter_2.pth', steps=2)


@pytest.mark.slow
@pytest.mark.parametrize('own_hook', [True, False])
def test_amp_trains_a_detector_on_cpu(tmp_path, own_hook):
    # the quick-start's RoI layers are SparseRoIAlign, whose sparse products
    # have no bfloat16 kernel, and its RPN calls mmcv's float32-only NMS in
    # training: with or without the config's FeatureAutocastHook, --amp
    # must hand them float32
    overrides = DET_OVERRIDES + ('' if own_hook else 'custom_hooks = []\n')
    config = tiny_config(tmp_path, DET_CONFIG, overrides)
    out = _train(config, tmp_path / 'amp', '--amp', '--cfg-options',
                 'train_dataloader.batch_size=4',
                 'default_hooks.logger.interval=1')
    _assert_finite_training(out, tmp_path / 'amp' / 'epoch_1.pth', steps=2)


def _assert_finite_training(log: str, checkpoint, steps: int) -> None:
    """The training ``log`` reports ``steps`` finite losses, and the weights
    saved in ``checkpoint`` are finite."""
    losses = [
        float(part.split(':')[1]) for line in log.splitlines()
        if 'train)' in line for part in line.split('  ')
        if part.startswith('loss:')
    ]
    assert len(losses) == steps
    assert all(torch.isfinite(torch.tensor(losses)))
    weights = torch.load(checkpoint)['state_dict']
    assert all(torch.isfinite(v).all() for v in weights.values()
               if v.is_floating_point())
