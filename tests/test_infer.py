"""tools/infer.py (and ``mim run agent_mm infer``): pictures and JSON for
images, folders and videos; bad inputs reported by name, the batch goes on.

The checkpoints are the tiny quick-start models at their random
initialisation, saved as training saves them (with the data set's classes).
"""
import errno
import glob
import json
import os
import os.path as osp
import subprocess
import sys
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from tiny_configs import (DET_CONFIG, DET_OVERRIDES, REPO, SEG_CONFIG,
                          SEG_OVERRIDES, tiny_config)

from agent_mm.apis import build_predictor, inference, run_inference
from agent_mm.datasets import (ShapesDetDataset, ShapesSegDataset,
                               generate_shapes)

sys.path.insert(0, osp.join(REPO, 'tools'))
import infer as infer_tool  # noqa: E402

# one block per stage, few proposals and instances
DET_FAST = '''
model = dict(
    backbone=dict(depths=[1, 1, 1, 1]),
    test_cfg=dict(rpn=dict(nms_pre=50, max_per_img=10),
                  rcnn=dict(max_per_img=5)))
'''
SEG_FAST = '''
model = dict(backbone=dict(depths=[1, 1, 1, 1]))
'''

TASKS = {
    'detection': (DET_CONFIG, DET_OVERRIDES + DET_FAST, ShapesDetDataset),
    'segmentation': (SEG_CONFIG, SEG_OVERRIDES + SEG_FAST, ShapesSegDataset)
}
GOOD = ('000001', '000002', 'gray')


def _save_checkpoint(config: str, path: str, dataset_class: type) -> None:
    """A model of ``config`` at its initialisation, saved as training does."""
    cfg = Config.fromfile(config)
    init_default_scope(cfg.default_scope)
    model = MODELS.build(cfg.model)
    meta = dict(dataset_meta=dict(dataset_class.METAINFO))
    torch.save({'state_dict': model.state_dict(), 'meta': meta}, path)


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    """Per task: its config, checkpoint and generated 64-pixel images."""
    root = tmp_path_factory.mktemp('infer')
    images = osp.join(generate_shapes(
        str(root / 'shapes'), num_train=1, num_val=3, img_size=64), 'images',
                      'val')
    models = {}
    for task, (base, overrides, dataset_class) in TASKS.items():
        config = tiny_config(root, base, overrides)
        checkpoint = str(root / f'{task}.pth')
        _save_checkpoint(config, checkpoint, dataset_class)
        models[task] = SimpleNamespace(
            config=config, checkpoint=checkpoint, images=images,
            classes=dataset_class.METAINFO['classes'])
    return models


@pytest.fixture(scope='module', params=sorted(TASKS))
def task(request, models):
    """A task's files and its predictor (built once)."""
    model = models[request.param]
    model.predictor = build_predictor(
        model.config, model.checkpoint, device='cpu')
    return model


def _folder(path, images: str) -> str:
    """Two images, a grayscale one, a corrupt one, a dangling link, a text
    file and a subfolder with an image (not searched)."""
    os.makedirs(osp.join(path, 'more'))
    os.symlink(
        osp.join(images, '000003.png'), osp.join(path, 'more', 'inner.png'))
    for name in GOOD[:2]:
        os.symlink(osp.join(images, name + '.png'), osp.join(path,
                                                             name + '.png'))
    gray = cv2.imread(osp.join(images, '000003.png'), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(osp.join(path, 'gray.png'), gray)
    assert cv2.imread(osp.join(path, 'gray.png'),
                      cv2.IMREAD_UNCHANGED).ndim == 2
    with open(osp.join(path, 'broken.png'), 'wb') as f:
        f.write(np.random.default_rng(0).bytes(300))
    os.symlink(osp.join(path, 'nowhere.png'), osp.join(path, 'gone.png'))
    with open(osp.join(path, 'notes.txt'), 'w') as f:
        f.write('not an image\n')
    return str(path)


def _check_image_outputs(out_dir, names, classes) -> None:
    for name in names:
        picture = cv2.imread(osp.join(out_dir, 'vis', name + '.png'))
        assert picture.shape == (64, 64, 3), name
        with open(osp.join(out_dir, 'preds', name + '.json')) as f:
            record = json.load(f)
        assert record['input'].endswith(name + '.png')
        assert (record['height'], record['width']) == (64, 64)
        assert record['predictions'], name
        for prediction in record['predictions']:
            assert prediction['class'] == classes[prediction['label']]
            assert prediction['mask']['size'] == [64, 64]
    assert sorted(os.listdir(osp.join(out_dir, 'vis'))) == sorted(
        name + '.png' for name in names)


def test_folder_with_bad_entries(task, tmp_path, capsys):
    folder = _folder(tmp_path / 'photos', task.images)
    out_dir = str(tmp_path / 'out')
    status = infer_tool.main([
        task.config, task.checkpoint, folder, '--out-dir', out_dir,
        '--device', 'cpu'
    ])
    assert status == 0
    _check_image_outputs(out_dir, GOOD, task.classes)
    captured = capsys.readouterr()
    assert (f'failed {folder}/broken.png: not a decodable image: corrupt'
            in captured.err)
    assert (f'failed {folder}/gone.png: no such file or directory'
            in captured.err)
    assert f'skipped {folder}/notes.txt: not an image or video file' in (
        captured.err)
    assert (f'skipped {folder}/more: a folder (subfolders are not searched)'
            in captured.err)
    assert '3 done, 2 failed, 2 skipped\n' in captured.out
    assert f'failed {folder}/broken.png' in captured.out


def _video(path: str, images: str) -> str:
    """A 3-frame, 5 fps Motion-JPEG video of the generated images."""
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*'MJPG'), 5,
                             (64, 64))
    for name in GOOD[:2] + ('000003', ):
        writer.write(cv2.imread(osp.join(images, name + '.png')))
    writer.release()
    return path


class _StoppingPredictor:
    """``predictor`` until its ``stop_at``-th call, which raises ``error``."""

    def __init__(self, predictor, error: BaseException,
                 stop_at: int = 2) -> None:
        self.predictor, self.error, self.stop_at = predictor, error, stop_at
        self.calls = 0

    def __call__(self, name, image):
        self.calls += 1
        if self.calls == self.stop_at:
            raise self.error
        return self.predictor(name, image)


def _outputs(out_dir: str) -> list:
    """Every file under ``out_dir`` (hidden temporary ones included)."""
    return sorted(
        osp.relpath(osp.join(folder, name), out_dir)
        for folder, _, names in os.walk(out_dir) for name in names)


def test_video(task, tmp_path):
    video = _video(str(tmp_path / 'clip.avi'), task.images)
    out_dir = str(tmp_path / 'out')
    summary = run_inference(task.predictor, [video], out_dir)
    assert summary.done == [video] and not summary.failed
    capture = cv2.VideoCapture(osp.join(out_dir, 'vis', 'clip.avi'))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame.shape)
    assert frames == [(64, 64, 3)] * 3
    with open(osp.join(out_dir, 'preds', 'clip.json')) as f:
        record = json.load(f)
    assert record['fps'] == 5
    assert [frame['frame'] for frame in record['frames']] == [0, 1, 2]
    assert all(frame['predictions'] for frame in record['frames'])


def test_video_failing_midway_leaves_nothing(task, tmp_path):
    video = _video(str(tmp_path / 'clip.avi'), task.images)
    predictor = _StoppingPredictor(task.predictor,
                                   RuntimeError('out of memory'))
    out_dir = str(tmp_path / 'out')
    summary = run_inference(predictor, [video], out_dir)
    assert summary.failed == [(video, 'RuntimeError: out of memory')]
    assert predictor.calls == 2
    assert _outputs(out_dir) == []


def test_interrupted_video_leaves_nothing(task, tmp_path):
    video = _video(str(tmp_path / 'clip.avi'), task.images)
    predictor = _StoppingPredictor(task.predictor, KeyboardInterrupt())
    out_dir = str(tmp_path / 'out')
    with pytest.raises(KeyboardInterrupt):
        run_inference(predictor, [video], out_dir)
    assert predictor.calls == 2
    assert _outputs(out_dir) == []


# the picture and the JSON of an input are renamed into place one after the
# other: whichever fails, neither is left
@pytest.mark.parametrize('failing', [('.json', ), ('.png', '.avi')])
def test_failed_output_write_leaves_nothing(task, tmp_path, monkeypatch,
                                            failing):
    replace = os.replace

    def full_disk(src: str, dst: str) -> None:
        """``os.replace``, failing for the ``failing`` files."""
        if dst.endswith(failing):
            raise OSError(errno.ENOSPC, 'No space left on device')
        replace(src, dst)

    monkeypatch.setattr(os, 'replace', full_disk)
    inputs = [
        osp.join(task.images, '000001.png'),
        _video(str(tmp_path / 'clip.avi'), task.images)
    ]
    out_dir = str(tmp_path / 'out')
    summary = run_inference(task.predictor, inputs, out_dir)
    assert summary.failed == [
        (path, 'OSError: [Errno 28] No space left on device')
        for path in inputs
    ]
    assert _outputs(out_dir) == []


def test_empty_folder_and_subfolders_are_skipped(tmp_path, capsys):
    empty = tmp_path / 'empty'
    empty.mkdir()
    nested = tmp_path / 'nested'
    (nested / 'inner').mkdir(parents=True)
    (nested / 'inner' / 'photo.png').write_bytes(b'')
    summary = run_inference(None, [str(empty), str(nested)],
                            str(tmp_path / 'out'))  # nothing to predict on
    no_files = 'a folder holding no image or video file'
    assert summary.skipped == [
        (str(empty), no_files),
        (str(nested / 'inner'), 'a folder (subfolders are not searched)'),
        (str(nested), no_files)
    ]
    assert not summary.done and not summary.failed
    assert f'skipped {empty}: {no_files}\n' in capsys.readouterr().err


def test_nothing_done_exits_non_zero(task, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(infer_tool, 'build_predictor',
                        lambda *args, **kwargs: task.predictor)
    missing = str(tmp_path / 'missing.png')
    empty = tmp_path / 'empty'
    empty.mkdir()
    status = infer_tool.main([
        task.config, task.checkpoint, missing,
        str(empty), '--out-dir',
        str(tmp_path / 'out')
    ])
    assert status == 1
    captured = capsys.readouterr()
    assert f'failed {missing}: no such file or directory' in captured.err
    assert '0 done, 1 failed, 1 skipped\n' in captured.out
    assert f'skipped {empty}: a folder holding no image' in captured.out


def test_freed_memory_is_kept_before_the_model_is_built(task, tmp_path,
                                                        monkeypatch):
    calls = []
    monkeypatch.setattr(infer_tool, 'keep_freed_memory',
                        lambda: calls.append('kept'))
    monkeypatch.setattr(
        infer_tool, 'build_predictor',
        lambda *args, **kwargs: calls.append('built') or task.predictor)
    infer_tool.main([
        task.config, task.checkpoint,
        str(tmp_path / 'missing.png'), '--out-dir',
        str(tmp_path / 'out')
    ])
    assert calls == ['kept', 'built']


def test_cfg_options_reach_the_predictor(task, tmp_path, monkeypatch):
    configs = []
    monkeypatch.setattr(
        infer_tool, 'build_predictor',
        lambda cfg, *args, **kwargs: configs.append(cfg) or task.predictor)
    infer_tool.main([
        task.config, task.checkpoint,
        str(tmp_path / 'missing.png'), '--out-dir',
        str(tmp_path / 'out'), '--cfg-options', 'model.backbone.depths=[1,2]'
    ])
    assert configs[0].model.backbone.depths == [1, 2]


def test_file_without_read_permission(task, tmp_path, monkeypatch):
    locked = tmp_path / 'locked.png'
    locked.write_bytes(b'')
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads it anyway: refuse as for a user
        def refusing_open(path, *args, **kwargs):
            if path == str(locked):
                raise PermissionError(errno.EACCES, 'Permission denied', path)
            return open(path, *args, **kwargs)

        monkeypatch.setattr(inference, 'open', refusing_open, raising=False)
    good = osp.join(task.images, '000001.png')
    summary = run_inference(task.predictor, [str(locked), good],
                            str(tmp_path / 'out'))
    assert summary.failed == [(str(locked), 'permission denied')]
    assert summary.done == [good]


def test_checkpoint_of_another_model_is_refused(models):
    detection, segmentation = models['detection'], models['segmentation']
    with pytest.raises(ValueError) as info:
        build_predictor(detection.config, segmentation.checkpoint, 'cpu')
    message = str(info.value)
    assert f'Checkpoint {segmentation.checkpoint!r} does not match' in message
    assert 'another model or arch' in message


def test_output_names_are_unique():
    names = inference.OutputNames()
    assert [names(path) for path in ('a/x.png', 'b/x.jpg', 'x_1.png',
                                     'x.mp4')] == ['x', 'x_1', 'x_1_1', 'x_2']


@pytest.mark.slow
def test_mim_run(models, tmp_path):
    detection = models['detection']
    folder = _folder(tmp_path / 'photos', detection.images)
    out_dir = str(tmp_path / 'out')
    result = subprocess.run([
        sys.executable, '-m', 'mim', 'run', 'agent_mm', 'infer',
        detection.config, detection.checkpoint, folder, '--out-dir', out_dir,
        '--device', 'cpu'
    ],
                            capture_output=True,
                            text=True,
                            timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert f'failed {folder}/broken.png' in result.stderr
    assert sorted(glob.glob(osp.join(out_dir, 'preds', '*.json'))) == [
        osp.join(out_dir, 'preds', name + '.json') for name in GOOD
    ]
