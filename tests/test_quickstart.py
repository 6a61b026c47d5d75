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
from tiny_configs import DET_OVERRIDES, SEG_OVERRIDES, tiny_config

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
    config = tiny_config(tmp_path, base, overrides)
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
