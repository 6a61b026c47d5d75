"""The quick-start, end to end through the commands users run.

Each flow trains on a tiny generated shapes set with ``mim train``, resumes
from the saved checkpoint with ``--resume``, then evaluates with ``mim test``
and checks the printed metric and the saved visualisation.
"""
import glob
import os.path as osp
import subprocess
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
QUICKSTART = osp.join(REPO, 'configs', 'quickstart')
TINY_DATA = 'dict(num_train=8, num_val=4, img_size=64, seed=1)'

pytestmark = pytest.mark.slow


def _mim(*args: str, cwd: str) -> str:
    """Run ``mim`` from this environment; return its output."""
    result = subprocess.run([sys.executable, '-m', 'mim', *args],
                            cwd=cwd,
                            capture_output=True,
                            text=True,
                            timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def _tiny_config(tmp_path, base: str, overrides: str) -> str:
    data_root = str(tmp_path / 'shapes') + '/'
    path = tmp_path / osp.basename(base)
    path.write_text(f'_base_ = {osp.join(QUICKSTART, base)!r}\n'
                    f'data_root = {data_root!r}\n'
                    f'generate = {TINY_DATA}\n' + overrides)
    return str(path)


DET_OVERRIDES = '''
train_dataloader = dict(
    num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, generate=generate))
val_dataloader = dict(
    num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, generate=generate))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator
train_cfg = dict(max_epochs=1, val_interval=1)
'''

SEG_OVERRIDES = '''
train_dataloader = dict(
    num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, generate=generate))
val_dataloader = dict(
    num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, generate=generate))
test_dataloader = val_dataloader
model = dict(data_preprocessor=dict(size=(64, 64)))
train_cfg = dict(max_iters=2, val_interval=2)
default_hooks = dict(checkpoint=dict(interval=2))
'''


FLOWS = {
    # name: (config, overrides, first trainer, stop/resume options,
    #        checkpoints, resume message, metric, visualisations)
    'detection': ('mask-rcnn_agent-pvt-t_fpn_shapes.py', DET_OVERRIDES,
                  'mmdet',  # mmdet's own train script takes our config too
                  'train_cfg.max_epochs=2', ('epoch_1.pth', 'epoch_2.pth'),
                  'resumed epoch: 1', ('coco/bbox_mAP:', 'coco/segm_mAP:'),
                  '*/vis/*.png'),
    'segmentation': ('fpn_agent-pvt-t_shapes.py', SEG_OVERRIDES, 'agent_mm',
                     'train_cfg.max_iters=4', ('iter_2.pth', 'iter_4.pth'),
                     'resumed epoch: 0, iter: 2', ('mIoU:', ),
                     'vis/**/*.png'),
}


@pytest.mark.parametrize('flow', sorted(FLOWS))
def test_quickstart_train_resume_test(tmp_path, flow):
    (base, overrides, first_trainer, longer, (first, last), resumed,
     metrics, pngs) = FLOWS[flow]
    config = _tiny_config(tmp_path, base, overrides)
    work_dir = str(tmp_path / 'work')

    _mim('train', first_trainer, config, '--work-dir', work_dir,
         cwd=tmp_path)
    assert osp.isfile(osp.join(work_dir, first))

    out = _mim('train', 'agent_mm', config, '--work-dir', work_dir,
               '--resume', '--cfg-options', longer, cwd=tmp_path)
    assert resumed in out
    assert osp.isfile(osp.join(work_dir, last))

    out = _mim('test', 'agent_mm', config, '--checkpoint',
               osp.join(work_dir, last), '--work-dir', work_dir,
               '--show-dir', 'vis', cwd=tmp_path)
    for metric in metrics:
        assert metric in out
    images = glob.glob(osp.join(work_dir, pngs), recursive=True)
    assert len(images) == 4  # one per validation image
