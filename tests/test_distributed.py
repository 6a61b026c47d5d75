"""Two CPU processes (gloo) train the quick-start model in lockstep, started
by torchrun (``tools/dist_train.sh``) or as ``srun`` starts them."""
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch
from torch.distributed.elastic.utils.distributed import get_free_port

import agent_mm  # noqa: F401  (reads mmengine checkpoints safely)

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TESTS = osp.join(REPO, 'tests')

pytestmark = pytest.mark.slow

CONFIG = '''
_base_ = {base!r}
custom_imports = dict(
    imports=['agent_mm', 'agent_mm.datasets', 'dist_helpers'],
    allow_failed_imports=False)
data_root = {data_root!r}
generate = dict(num_train=8, num_val=4, img_size=64, seed=1)
# SyncBN as in the paper's configs: the CPU run must fall back to BN
model = dict(
    data_preprocessor=dict(size=(64, 64)),
    decode_head=dict(norm_cfg=dict(type='SyncBN', requires_grad=True)))
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, generate=generate))
val_dataloader = dict(
    num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, generate=generate))
test_dataloader = val_dataloader
train_cfg = dict(max_iters=3, val_interval=3)
default_hooks = dict(checkpoint=dict(interval=3))
custom_hooks = [dict(type='SaveRankWeightsHook')]
'''


def _slurm_processes(config, work_dir, env):
    """Two ``tools/train.py --launcher slurm`` processes with the variables
    ``srun`` gives its tasks (one node)."""
    return [
        subprocess.Popen(
            [sys.executable, osp.join(REPO, 'tools', 'train.py'),
             str(config), '--work-dir', str(work_dir), '--launcher', 'slurm'],
            env=dict(env, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                     SLURM_NTASKS='2', SLURM_NODELIST='localhost',
                     MASTER_ADDR='127.0.0.1', MASTER_PORT=env['PORT']),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            cwd=config.parent) for rank in (0, 1)
    ]


@pytest.mark.parametrize('launcher', ['pytorch', 'slurm'])
def test_two_processes_train_and_keep_identical_weights(tmp_path, launcher):
    config = tmp_path / 'dist_seg.py'
    config.write_text(
        CONFIG.format(
            base=osp.join(REPO, 'configs', 'quickstart',
                          'fpn_agent-pvt-t_shapes.py'),
            data_root=str(tmp_path / 'shapes') + '/'))
    work_dir = tmp_path / 'work'
    env = dict(
        os.environ,
        PATH=osp.dirname(sys.executable) + os.pathsep + os.environ['PATH'],
        PYTHONPATH=TESTS,
        # a fixed port fails while another run of the suite holds it
        PORT=str(get_free_port()),
        OMP_NUM_THREADS='1')
    if launcher == 'pytorch':
        result = subprocess.run(
            ['bash', osp.join(REPO, 'tools', 'dist_train.sh'), str(config),
             '2', '--work-dir', str(work_dir)],
            cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=600)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    else:
        processes = _slurm_processes(config, work_dir, env)
        for process in processes:
            output = process.communicate(timeout=600)[0]
            assert process.returncode == 0, output[-4000:]

    ranks = [torch.load(work_dir / f'rank{r}.pth') for r in (0, 1)]
    # parameters are all-reduced; BN running statistics stay per process
    assert ranks[0]['params'].keys() == ranks[1]['params'].keys()
    for key, value in ranks[0]['params'].items():
        torch.testing.assert_close(value, ranks[1]['params'][key], msg=key)
    assert ranks[0]['norms'] == ranks[1]['norms'] == ['BatchNorm2d']
    # training happened: the saved checkpoint differs from the initial model
    checkpoint = torch.load(work_dir / 'iter_3.pth')
    assert checkpoint['meta']['iter'] == 3
    assert 'mIoU' in next(work_dir.glob('*/*.log')).read_text()
