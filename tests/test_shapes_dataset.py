"""Shapes data set: generation, atomic writing and the dataset classes."""
import hashlib
import json
import os
import os.path as osp
import re
import shutil
import socket
import subprocess
import sys
import time
import warnings

import cv2
import numpy as np
import pytest
from mmengine.registry import DefaultScope
from pycocotools.coco import COCO

from agent_mm.datasets import shapes
from agent_mm.datasets.shapes import ensure_shapes, generate_shapes

TINY = dict(num_train=6, num_val=3, img_size=64)


@pytest.fixture(scope='module')
def tiny_root(tmp_path_factory) -> str:
    """A tiny shapes data set shared by the read-only tests."""
    return generate_shapes(
        str(tmp_path_factory.mktemp('tiny') / 'shapes'), **TINY)


def _files(root: str) -> dict:
    """Relative path -> bytes of every file under ``root``."""
    contents = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = osp.join(folder, name)
            with open(path, 'rb') as f:
                contents[osp.relpath(path, root)] = f.read()
    return contents


def _coco(root: str, split: str) -> COCO:
    return COCO(osp.join(root, 'annotations', f'instances_{split}.json'))


def _label_map(root: str, split: str, file_name: str) -> np.ndarray:
    return cv2.imread(
        osp.join(root, 'ann_semseg', split, file_name), cv2.IMREAD_UNCHANGED)


def test_layout_and_coco_file_load(tiny_root):
    for split, num_images in (('train', 6), ('val', 3)):
        coco = _coco(tiny_root, split)
        assert [c['name'] for c in coco.loadCats([1, 2, 3])
                ] == ['circle', 'square', 'triangle']
        assert len(coco.getImgIds()) == num_images
        for img in coco.loadImgs(coco.getImgIds()):
            assert (img['width'], img['height']) == (64, 64)
            assert osp.isfile(
                osp.join(tiny_root, 'images', split, img['file_name']))
            label_map = _label_map(tiny_root, split, img['file_name'])
            assert label_map.shape == (64, 64)
            assert label_map.dtype == np.uint8
            assert 1 <= len(coco.getAnnIds(imgIds=img['id'])) <= 3
        for ann in coco.loadAnns(coco.getAnnIds()):
            assert ann['iscrowd'] == 0
            assert ann['area'] > 0
    image = cv2.imread(osp.join(tiny_root, 'images', 'train', '000001.png'))
    assert image.shape == (64, 64, 3)


def test_images_and_label_maps_are_stored_uncompressed(tiny_root):
    """Decoding a compressed PNG of noise costs most of a training step's
    data loading; stored uncompressed, a file holds at least its pixels."""
    for kind, channels in (('images', 3), ('ann_semseg', 1)):
        path = osp.join(tiny_root, kind, 'train', '000001.png')
        assert osp.getsize(path) >= 64 * 64 * channels


def test_same_seed_is_byte_identical_other_seed_differs(tiny_root, tmp_path):
    again = generate_shapes(str(tmp_path / 'again'), **TINY)
    assert _files(again) == _files(tiny_root)

    other = generate_shapes(str(tmp_path / 'other'), seed=1, **TINY)
    ann_file = osp.join('annotations', 'instances_train.json')
    assert _files(other)[ann_file] != _files(tiny_root)[ann_file]


def test_polygons_match_label_maps_and_boxes_are_tight(tiny_root):
    for split in shapes.SPLITS:
        coco = _coco(tiny_root, split)
        for img in coco.loadImgs(coco.getImgIds()):
            label_map = _label_map(tiny_root, split, img['file_name'])
            annotated = np.zeros_like(label_map)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=img['id'])):
                polygon = np.array(ann['segmentation'][0]).reshape(-1, 2)
                x, y, w, h = ann['bbox']
                np.testing.assert_allclose(polygon.min(0), [x, y], atol=0.01)
                np.testing.assert_allclose(
                    polygon.max(0), [x + w, y + h], atol=0.01)

                mask = coco.annToMask(ann).astype(bool)
                # Boxes keep a gap, so near this box only this shape shows.
                near = np.zeros_like(mask)
                near[max(int(y) - 1, 0):int(np.ceil(y + h)) + 1,
                     max(int(x) - 1, 0):int(np.ceil(x + w)) + 1] = True
                drawn = near & (label_map == ann['category_id'])
                iou = (mask & drawn).sum() / (mask | drawn).sum()
                assert iou > 0.9, (img['file_name'], ann['id'], iou)
                assert ann['area'] == pytest.approx(mask.sum(), rel=0.1)
                annotated[drawn] = ann['category_id']
            # Every labelled pixel belongs to an annotated shape.
            np.testing.assert_array_equal(annotated, label_map)


def test_shapes_do_not_overlap(tiny_root):
    coco = _coco(tiny_root, 'train')
    for img_id in coco.getImgIds():
        boxes = [ann['bbox'] for ann in coco.loadAnns(coco.getAnnIds(img_id))]
        for i, (x1, y1, w1, h1) in enumerate(boxes):
            for x2, y2, w2, h2 in boxes[i + 1:]:
                assert (x1 + w1 < x2 or x2 + w2 < x1 or y1 + h1 < y2
                        or y2 + h2 < y1)


@pytest.mark.parametrize('kwargs, message', [
    (dict(img_size=16), 'img_size'),
    (dict(min_shapes=4, max_shapes=3), 'min_shapes'),
    (dict(max_shapes=11), 'max_shapes'),
    (dict(num_train=0), 'num_train'),
    (dict(num_val=1.5), 'num_val'),
    (dict(seed=-1), 'seed'),
])
def test_invalid_arguments_raise_value_error(tmp_path, kwargs, message):
    root = tmp_path / 'shapes'
    with pytest.raises(ValueError, match=message):
        generate_shapes(str(root), **kwargs)
    with pytest.raises(ValueError, match=message):
        ensure_shapes(str(root), **kwargs)
    assert not root.exists()


@pytest.mark.parametrize('error', [OSError, KeyboardInterrupt])
def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch, error):
    written = []

    def fail_on_fifth_png(path, array):
        if len(written) == 4:
            raise error('disk full')
        written.append(path)

    monkeypatch.setattr(shapes, 'write_png', fail_on_fifth_png)
    with pytest.raises(error, match='disk full'):
        generate_shapes(str(tmp_path / 'shapes'), **TINY)
    assert len(written) == 4
    assert os.listdir(tmp_path) == []


def test_losing_the_rename_race_keeps_the_winner(tmp_path, monkeypatch):
    root = tmp_path / 'shapes'
    write_split = shapes.write_split

    def another_rank_finishes_first(*args):
        root.mkdir(exist_ok=True)
        (root / 'winner').touch()
        write_split(*args)

    monkeypatch.setattr(shapes, 'write_split', another_rank_finishes_first)
    assert generate_shapes(str(root), **TINY) == str(root)
    assert os.listdir(root) == ['winner']
    assert os.listdir(tmp_path) == ['shapes']


def test_complete_root_is_not_regenerated(tiny_root):
    before = _files(tiny_root)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert ensure_shapes(tiny_root, **TINY) == tiny_root
    with pytest.raises(FileExistsError):
        generate_shapes(tiny_root, **TINY)
    with pytest.warns(UserWarning, match='generated with'):
        ensure_shapes(tiny_root, seed=1, **TINY)
    assert _files(tiny_root) == before


@pytest.fixture
def root(tmp_path) -> str:
    """A tiny shapes data set to damage, by its real path (messages name)."""
    return generate_shapes(osp.realpath(tmp_path / 'shapes'), **TINY)


def _truncate(path: str) -> None:
    """Cut the file at ``path`` in half, as a killed copy would."""
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) // 2])


def _flip_last_byte(path: str) -> None:
    """Change the file at ``path`` but not its size."""
    with open(path, 'r+b') as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))


def _add_a_copy(path: str) -> None:
    """Copy the image at ``path`` as an extra image of its split."""
    shutil.copy(path, osp.join(osp.dirname(path), '000099.png'))


@pytest.mark.parametrize('damage, path, named', [
    (os.remove, 'images/train/000002.png', 'images/train'),
    (_truncate, 'ann_semseg/val/000001.png', 'ann_semseg/val/000001.png'),
    (_flip_last_byte, 'images/val/000003.png', 'images/val/000003.png'),
    (_add_a_copy, 'images/val/000001.png', 'images/val'),
    (shutil.rmtree, 'ann_semseg', 'ann_semseg/train'),
    (os.remove, 'manifest.json', 'manifest.json'),
])
def test_damaged_root_is_regenerated(tiny_root, root, damage, path, named):
    damage(osp.join(root, path))
    with pytest.warns(UserWarning, match='incomplete or damaged') as record:
        assert ensure_shapes(root, **TINY) == root
    assert osp.join(root, named) in str(record[0].message)
    assert _files(root) == _files(tiny_root)
    assert os.listdir(osp.dirname(root)) == ['shapes']


def test_truncated_annotation_file_names_itself_and_the_fix(tiny_root, root):
    ann_file = osp.join(root, 'annotations', 'instances_train.json')
    _truncate(ann_file)
    # Not deleted while it holds files of someone else.
    open(osp.join(root, 'notes.txt'), 'w').close()
    with pytest.raises(RuntimeError) as error:
        ensure_shapes(root, **TINY)
    for part in (ann_file, 'notes.txt', f'delete {root}',
                 'generated again on the next run'):
        assert part in str(error.value)
    assert osp.isfile(osp.join(root, 'notes.txt'))

    os.remove(osp.join(root, 'notes.txt'))
    with pytest.warns(UserWarning, match=re.escape(ann_file)):
        ensure_shapes(root, **TINY)
    assert _files(root) == _files(tiny_root)


def test_damaged_root_removed_meanwhile_by_another_rank(root, monkeypatch):
    find_damage = shapes.find_damage

    def another_rank_removes_it_after_the_check(path):
        damage = find_damage(path)
        shutil.rmtree(path)
        return damage

    monkeypatch.setattr(shapes, 'find_damage',
                        another_rank_removes_it_after_the_check)
    os.remove(osp.join(root, 'manifest.json'))
    assert ensure_shapes(root, **TINY) == root
    assert find_damage(root) is None


def test_symlinked_root_is_regenerated_at_its_target(tiny_root, root,
                                                     tmp_path):
    link = tmp_path / 'link'
    link.symlink_to(root)
    os.remove(osp.join(root, 'manifest.json'))
    with pytest.warns(UserWarning, match='incomplete or damaged'):
        assert ensure_shapes(str(link), **TINY) == str(link)
    assert link.is_symlink()
    assert _files(root) == _files(tiny_root)
    assert sorted(os.listdir(tmp_path)) == ['link', 'shapes']


def _ended_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, '-c', ''])
    process.wait()
    return process.pid


def test_stale_temporary_folders_are_removed(tmp_path):
    host = socket.gethostname()
    ended = _ended_pid()
    kept = {
        f'.shapes.tmp-{host}-{os.getpid()}-0123abcd',  # a live process
        f'.shapes.tmp-elsewhere-{ended}-0123abcd',  # another host, recent
        '.shapes.tmp-a1b2c3d4',  # no owner (older versions), recent
        f'.other.tmp-{host}-{ended}-0123abcd',  # not ours
    }
    killed_here = f'.shapes.tmp-{host}-{ended}-4567cdef'
    old = {f'.shapes.tmp-elsewhere-{ended}-4567cdef', '.shapes.tmp-e5f6g7h8'}
    for name in kept | old | {killed_here}:
        os.makedirs(tmp_path / name / 'images' / 'train')
    two_days_ago = time.time() - 2 * 24 * 3600
    for name in old:
        os.utime(tmp_path / name, (two_days_ago, two_days_ago))
    ensure_shapes(str(tmp_path / 'shapes'), **TINY)
    assert set(os.listdir(tmp_path)) == kept | {'shapes'}


def test_generated_folders_are_world_readable(tmp_path):
    umask = os.umask(0o022)
    try:
        root = generate_shapes(str(tmp_path / 'shapes'), **TINY)
    finally:
        os.umask(umask)
    for folder, _, names in os.walk(root):
        assert os.stat(folder).st_mode & 0o755 == 0o755, folder
        for name in names:
            path = osp.join(folder, name)
            assert os.stat(path).st_mode & 0o644 == 0o644, path


def test_generation_json_records_arguments(tiny_root):
    with open(osp.join(tiny_root, 'generation.json')) as f:
        assert json.load(f) == dict(seed=0, min_shapes=1, max_shapes=3, **TINY)


def test_manifest_records_counts_and_every_file(tiny_root):
    with open(osp.join(tiny_root, 'manifest.json')) as f:
        manifest = json.load(f)
    assert manifest['num_images'] == dict(train=6, val=3)
    files = _files(tiny_root)
    del files['manifest.json']
    assert sorted(manifest['files']) == sorted(files)
    for name, (size, digest) in manifest['files'].items():
        assert size == len(files[name])
        assert digest == hashlib.sha256(files[name]).hexdigest()


def test_det_dataset_generates_and_loads(tmp_path):
    from mmdet.registry import DATASETS
    data_root = str(tmp_path / 'shapes')
    cfg = dict(
        type='ShapesDetDataset',
        data_root=data_root,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='images/train/'),
        generate=TINY,
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
            dict(type='PackDetInputs')
        ])
    with DefaultScope.overwrite_default_scope('mmdet'):
        dataset = DATASETS.build(cfg)
        assert dataset.metainfo['classes'] == ('circle', 'square', 'triangle')
        assert len(dataset) == 6
        coco = _coco(data_root, 'train')
        for index in (0, 5):
            sample = dataset[index]
            img_id = sample['data_samples'].img_id
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
            instances = sample['data_samples'].gt_instances
            assert sample['inputs'].shape == (3, 64, 64)
            assert len(instances) == len(anns)
            assert sorted(instances.labels.tolist()) == sorted(
                ann['category_id'] - 1 for ann in anns)
            assert instances.masks.to_ndarray().shape == (len(anns), 64, 64)

        ann_file = osp.join(
            osp.realpath(data_root), 'annotations', 'instances_train.json')
        _truncate(ann_file)
        with pytest.warns(UserWarning, match=re.escape(ann_file)):
            assert len(DATASETS.build(cfg)) == 6


def test_seg_dataset_generates_and_loads(tmp_path):
    from mmseg.registry import DATASETS
    data_root = str(tmp_path / 'shapes')
    cfg = dict(
        type='ShapesSegDataset',
        data_root=data_root,
        data_prefix=dict(img_path='images/val', seg_map_path='ann_semseg/val'),
        generate=TINY,
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations'),
            dict(type='PackSegInputs')
        ])
    with DefaultScope.overwrite_default_scope('mmseg'):
        dataset = DATASETS.build(cfg)
        assert dataset.metainfo['classes'] == ('background', 'circle',
                                               'square', 'triangle')
        assert len(dataset) == 3
        sample = dataset[0]
    seg_map = sample['data_samples'].gt_sem_seg.data.numpy()[0]
    expected = _label_map(data_root, 'val', '000001.png')
    np.testing.assert_array_equal(seg_map, expected)
    assert set(np.unique(seg_map)) - {0} != set()


@pytest.mark.parametrize('name', ['ShapesDetDataset', 'ShapesSegDataset'])
def test_dataset_without_data_root_names_the_fix(name, tmp_path, monkeypatch):
    from agent_mm.datasets import ShapesDetDataset, ShapesSegDataset
    cls = dict(ShapesDetDataset=ShapesDetDataset,
               ShapesSegDataset=ShapesSegDataset)[name]
    # nothing may be generated into the working directory
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=f'{name} needs a data_root'):
        cls(data_root='', generate=TINY)
    assert list(tmp_path.iterdir()) == []
