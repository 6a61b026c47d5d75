"""Generation of the synthetic "shapes" data set (numpy and cv2 only).

Each image shows a few (by default 1-3) filled circles, squares and triangles
of random colours on a textured noise background. Shapes never overlap (their
boxes keep a gap of a few pixels), so every polygon, box and label-map region
describes a fully visible object. The layout under ``root`` is::

    images/{train,val}/000001.png            RGB images
    annotations/instances_{train,val}.json   COCO instances (polygons)
    ann_semseg/{train,val}/000001.png        label maps, 0 = background,
                                             1 = circle, 2 = square,
                                             3 = triangle
    generation.json                          the arguments used
    manifest.json                            image count per split, size
                                             and SHA-256 of every other
                                             file (written last)

Polygon coordinates are continuous: pixel ``(row, col)`` covers
``[col, col + 1) x [row, row + 1)``, as in COCO.

The data set is written into a temporary sibling
``.{name}.tmp-{host}-{pid}-{random}`` of ``root``, then renamed. A temporary
folder left behind by a killed process is removed by the next
:func:`ensure_shapes` once it is stale: on the same host when process ``pid``
has ended; otherwise (another host, whose processes cannot be checked, or a
name without an owner) when it has been untouched for a day.
"""
import hashlib
import inspect
import json
import os
import os.path as osp
import re
import secrets
import shutil
import socket
import time
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import cv2
import numpy as np

CLASSES = ('circle', 'square', 'triangle')
SPLITS = ('train', 'val')
MIN_IMG_SIZE = 32
MAX_SHAPES = 10

# Vertices of the polygon drawn for each class (the circle is a 32-gon).
_NUM_VERTICES = {'circle': 32, 'square': 4, 'triangle': 3}
# Free pixels kept between the boxes of two shapes and around the image.
_GAP = 2
# Placement attempts for one shape before the image layout is restarted.
_TRIES_PER_SHAPE = 100
_MAX_LAYOUT_RESTARTS = 100
# Smallest Euclidean RGB distance between a shape and its background.
_MIN_CONTRAST = 100.0

MANIFEST = 'manifest.json'
# What the generator writes at the top of ``root``: a damaged ``root`` holding
# anything else is not deleted.
_LAYOUT = frozenset(
    ('images', 'annotations', 'ann_semseg', 'generation.json', MANIFEST))
# The owner at the end of a temporary folder's name.
_OWNER = re.compile(r'(?P<host>.+)-(?P<pid>[0-9]+)-[0-9a-f]+')
# Seconds after which a temporary folder of an unknown owner is stale.
_STALE_AFTER = 24 * 3600


class Shape(NamedTuple):
    """One drawn object: its category id (1-based) and polygon (N, 2)."""
    category_id: int
    polygon: np.ndarray

    @property
    def box(self) -> Tuple[float, float, float, float]:
        """Tight ``(x1, y1, x2, y2)`` box around the polygon."""
        x1, y1 = self.polygon.min(axis=0)
        x2, y2 = self.polygon.max(axis=0)
        return float(x1), float(y1), float(x2), float(y2)


def _check_int(name: str, value: int, minimum: int = 1) -> None:
    """Raise a ``ValueError`` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f'{name} must be an int, got {value!r}')
    if value < minimum:
        raise ValueError(f'{name} must be >= {minimum}, got {value}')


def _check_args(num_train: int, num_val: int, img_size: int, seed: int,
                min_shapes: int, max_shapes: int) -> None:
    """Raise a ``ValueError`` describing the first invalid argument."""
    _check_int('num_train', num_train)
    _check_int('num_val', num_val)
    _check_int('img_size', img_size, MIN_IMG_SIZE)
    _check_int('seed', seed, 0)
    _check_int('min_shapes', min_shapes, 0)
    _check_int('max_shapes', max_shapes, 1)
    if min_shapes > max_shapes:
        raise ValueError(f'min_shapes ({min_shapes}) must not exceed '
                         f'max_shapes ({max_shapes})')
    if max_shapes > MAX_SHAPES:
        raise ValueError(f'max_shapes must be <= {MAX_SHAPES} so that the '
                         f'shapes fit without overlapping, got {max_shapes}')


def _radius_range(img_size: int, max_shapes: int) -> Tuple[float, float]:
    """Circumradius range of the shapes; smaller when more must fit."""
    largest = img_size * min(0.2, 0.4 / float(np.sqrt(max_shapes)))
    return 0.4 * largest, largest


def _regular_polygon(num_vertices: int, radius: float,
                     angle: float) -> np.ndarray:
    """Vertices (N, 2) of a regular polygon centred on the origin."""
    angles = angle + 2 * np.pi * np.arange(num_vertices) / num_vertices
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _boxes_overlap(box: Tuple[float, ...], other: Tuple[float, ...]) -> bool:
    """Whether two boxes come closer than ``_GAP`` pixels."""
    return (box[0] < other[2] + _GAP and other[0] < box[2] + _GAP
            and box[1] < other[3] + _GAP and other[1] < box[3] + _GAP)


def _random_shape(rng: np.random.Generator, img_size: int,
                  radius_range: Tuple[float, float]) -> Shape:
    """A shape of random class, size, rotation and position in the image."""
    category_id = int(rng.integers(len(CLASSES))) + 1
    num_vertices = _NUM_VERTICES[CLASSES[category_id - 1]]
    outline = _regular_polygon(num_vertices, rng.uniform(*radius_range),
                               rng.uniform(0, 2 * np.pi))
    low = _GAP - outline.min(axis=0)
    high = img_size - _GAP - outline.max(axis=0)
    polygon = np.round(outline + rng.uniform(low, high), 2)
    return Shape(category_id, polygon)


def _place_without_overlap(rng: np.random.Generator, img_size: int,
                           radius_range: Tuple[float, float],
                           placed: List[Shape]) -> Optional[Shape]:
    """A random shape whose box keeps clear of those already placed.

    Returns ``None`` when ``_TRIES_PER_SHAPE`` attempts all collided.
    """
    for _ in range(_TRIES_PER_SHAPE):
        shape = _random_shape(rng, img_size, radius_range)
        if not any(_boxes_overlap(shape.box, other.box) for other in placed):
            return shape
    return None


def _layout(rng: np.random.Generator, img_size: int, num_shapes: int,
            radius_range: Tuple[float, float]) -> List[Shape]:
    """``num_shapes`` non-overlapping shapes, restarting on a dead end."""
    for _ in range(_MAX_LAYOUT_RESTARTS):
        shapes = []
        while len(shapes) < num_shapes:
            shape = _place_without_overlap(rng, img_size, radius_range, shapes)
            if shape is None:
                break
            shapes.append(shape)
        else:
            return shapes
    raise RuntimeError(f'could not place {num_shapes} shapes without overlap '
                       f'in a {img_size}x{img_size} image')


def _textured_background(rng: np.random.Generator,
                         img_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """A smooth random colour field (H, W, 3) and its mean colour."""
    base = rng.uniform(40, 215, size=3)
    coarse = rng.normal(0, 30, size=(4, 4, 3)).astype(np.float32)
    texture = cv2.resize(
        coarse, (img_size, img_size), interpolation=cv2.INTER_CUBIC)
    return (base + texture).astype(np.float32), base


def _contrasting_colour(rng: np.random.Generator,
                        background: np.ndarray) -> Tuple[float, ...]:
    """A random colour at least ``_MIN_CONTRAST`` away from ``background``."""
    while True:
        colour = rng.uniform(0, 255, size=3)
        if np.linalg.norm(colour - background) >= _MIN_CONTRAST:
            return tuple(float(c) for c in colour)


def _rasterise(polygon: np.ndarray, img_size: int) -> np.ndarray:
    """Mask (H, W) of the pixels whose centres lie inside a convex polygon.

    The vertices must turn counter-clockwise in (x, y), as those of
    :func:`_regular_polygon` do.
    """
    mask = np.zeros((img_size, img_size), bool)
    x1, y1 = np.floor(polygon.min(axis=0)).astype(int)
    x2, y2 = np.ceil(polygon.max(axis=0)).astype(int)
    ys, xs = np.mgrid[y1:y2, x1:x2] + 0.5
    inside = np.ones(xs.shape, bool)
    for (ax, ay), (bx, by) in zip(polygon, np.roll(polygon, -1, axis=0)):
        inside &= (bx - ax) * (ys - ay) - (by - ay) * (xs - ax) >= 0
    mask[y1:y2, x1:x2] = inside
    return mask


def _render(rng: np.random.Generator, img_size: int,
            shapes: List[Shape]) -> Tuple[np.ndarray, np.ndarray, List[int]]:
    """Draw the shapes; return the image, label map and per-shape areas."""
    image, background = _textured_background(rng, img_size)
    label_map = np.zeros((img_size, img_size), np.uint8)
    areas = []
    for shape in shapes:
        mask = _rasterise(shape.polygon, img_size)
        areas.append(int(mask.sum()))
        label_map[mask] = shape.category_id
        image[mask] = _contrasting_colour(rng, background)
    image += rng.normal(0, 10, size=image.shape).astype(np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), label_map, areas


def _coco_annotation(ann_id: int, image_id: int, shape: Shape,
                     area: int) -> dict:
    """The COCO instance annotation of one shape."""
    x1, y1, x2, y2 = shape.box
    return dict(
        id=ann_id,
        image_id=image_id,
        category_id=shape.category_id,
        bbox=[x1, y1, round(x2 - x1, 2),
              round(y2 - y1, 2)],
        segmentation=[[float(v) for v in shape.polygon.ravel()]],
        area=area,
        iscrowd=0)


def write_png(path: str, array: np.ndarray) -> None:
    """Write ``array`` as an uncompressed PNG, raising on failure (cv2
    only warns).

    The noise background barely compresses (148 KB of 197 at cv2's
    default level for a 256² image), and decoding a compressed image costs
    2-3 ms against 0.5 uncompressed: most of a training step's data
    loading.
    """
    if not cv2.imwrite(path, array, [cv2.IMWRITE_PNG_COMPRESSION, 0]):
        raise OSError(f'could not write {path}')


def write_split(root: str, split: str, num_images: int, img_size: int,
                seed: int, min_shapes: int, max_shapes: int) -> None:
    """Write the images, label maps and COCO file of one split."""
    image_dir = osp.join(root, 'images', split)
    label_dir = osp.join(root, 'ann_semseg', split)
    os.makedirs(image_dir)
    os.makedirs(label_dir)
    radius_range = _radius_range(img_size, max_shapes)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        # One stream per image: a split does not change with the other's size.
        rng = np.random.default_rng([seed, SPLITS.index(split), image_id])
        num_shapes = int(rng.integers(min_shapes, max_shapes + 1))
        shapes = _layout(rng, img_size, num_shapes, radius_range)
        image, label_map, areas = _render(rng, img_size, shapes)
        file_name = f'{image_id:06d}.png'
        write_png(osp.join(image_dir, file_name), image)
        write_png(osp.join(label_dir, file_name), label_map)
        images.append(
            dict(
                id=image_id,
                file_name=file_name,
                width=img_size,
                height=img_size))
        for shape, area in zip(shapes, areas):
            annotations.append(
                _coco_annotation(len(annotations) + 1, image_id, shape, area))
    coco = dict(
        info=dict(description=f'agent_mm synthetic shapes ({split})'),
        images=images,
        annotations=annotations,
        categories=[
            dict(id=i, name=name, supercategory='shape')
            for i, name in enumerate(CLASSES, 1)
        ])
    _write_json(osp.join(root, 'annotations', f'instances_{split}.json'), coco)


def _write_json(path: str, obj: dict) -> None:
    """Dump ``obj`` as compact JSON, creating the parent folder."""
    os.makedirs(osp.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(obj, f, separators=(',', ':'))


def _sha256(path: str) -> str:
    """Hex SHA-256 of the file at ``path``."""
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def _write_manifest(root: str, num_images: Dict[str, int]) -> None:
    """Record the image counts and the size and SHA-256 of every file."""
    files = {}
    for folder, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            path = osp.join(folder, name)
            files[osp.relpath(path, root)] = [osp.getsize(path), _sha256(path)]
    _write_json(
        osp.join(root, MANIFEST), dict(num_images=num_images, files=files))


def _file_damage(path: str, size: int, digest: str) -> Optional[str]:
    """What is wrong with one generated file, or None when it is intact."""
    try:
        actual = osp.getsize(path)
        intact = actual == size and _sha256(path) == digest
    except FileNotFoundError:
        return f'{path} is missing'
    if intact:
        return None
    if actual != size:
        return f'{path} has {actual} bytes instead of {size}'
    return f'{path} does not match its SHA-256 in {MANIFEST}'


def find_damage(root: str) -> Optional[str]:
    """The first sign that ``root`` is incomplete or damaged, or None.

    ``root`` is complete when its manifest (written last) is readable, every
    split folder holds as many files as the manifest counts images (the
    segmentation dataset lists these folders) and every file it records has
    the recorded size and SHA-256.
    """
    try:
        with open(osp.join(root, MANIFEST)) as f:
            manifest = json.load(f)
        num_images, files = manifest['num_images'], manifest['files']
    except (OSError, ValueError, KeyError, TypeError):
        return f'{osp.join(root, MANIFEST)} is missing or unreadable'
    for split, count in num_images.items():
        for folder in ('images', 'ann_semseg'):
            path = osp.join(root, folder, split)
            found = len(os.listdir(path)) if osp.isdir(path) else 0
            if found != count:
                return f'{path} holds {found} files instead of {count}'
    for name, (size, digest) in files.items():
        damage = _file_damage(osp.join(root, name), size, digest)
        if damage:
            return damage
    return None


def _temporary_prefix(root: str) -> str:
    """Start of the names of the temporary siblings of ``root``."""
    return f'.{osp.basename(osp.abspath(root))}.tmp-'


def _temporary_path(root: str) -> str:
    """A new path for a temporary sibling of ``root``, naming its owner."""
    owner = f'{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}'
    return osp.join(
        osp.dirname(osp.abspath(root)),
        _temporary_prefix(root) + owner)


def _is_running(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists but belongs to another user
    return True


def _is_stale(path: str, owner: str) -> bool:
    """Whether the temporary folder ``path`` was left by an ended process.

    See the module docstring for the rule; ``owner`` is the end of the
    folder's name (``{host}-{pid}-{random}``).
    """
    match = _OWNER.fullmatch(owner)
    if match and match['host'] == socket.gethostname():
        return not _is_running(int(match['pid']))
    try:
        return time.time() - osp.getmtime(path) > _STALE_AFTER
    except FileNotFoundError:
        return False  # another process removed it meanwhile


def _remove_stale_temporaries(root: str) -> None:
    """Delete the temporary siblings of ``root`` left by killed processes."""
    parent = osp.dirname(osp.abspath(root))
    prefix = _temporary_prefix(root)
    if not osp.isdir(parent):
        return
    for name in os.listdir(parent):
        path = osp.join(parent, name)
        if name.startswith(prefix) and _is_stale(path, name[len(prefix):]):
            shutil.rmtree(path, ignore_errors=True)


def _rename_unless_taken(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``; quietly give up if ``dst`` now exists."""
    try:
        os.rename(src, dst)
    except OSError:
        if not osp.isdir(dst):
            raise


def _write_atomically(root: str, write: Callable[[str], None]) -> None:
    """Run ``write`` on a temporary sibling of ``root``, then rename it.

    An interrupted ``write`` (an exception, ``KeyboardInterrupt`` included)
    leaves no ``root`` and no temporary folder behind. When another process
    created ``root`` in the meantime, its copy wins and ours is discarded.
    The folders get the mode the umask gives (``tempfile.mkdtemp`` would make
    the top one private).
    """
    root = osp.abspath(root)
    os.makedirs(osp.dirname(root), exist_ok=True)
    tmp_root = _temporary_path(root)
    os.mkdir(tmp_root)
    try:
        write(tmp_root)
        _rename_unless_taken(tmp_root, root)
    finally:
        # Left over only on failure or when another process won the race.
        shutil.rmtree(tmp_root, ignore_errors=True)


def generate_shapes(root: str,
                    num_train: int = 200,
                    num_val: int = 50,
                    img_size: int = 256,
                    seed: int = 0,
                    min_shapes: int = 1,
                    max_shapes: int = 3) -> str:
    """Generate the shapes data set at ``root`` (see the module docstring).

    The output depends only on the arguments. Writing is atomic: ``root``
    appears complete or not at all, and concurrent calls (one per rank) are
    safe: the first to finish wins and the others discard their copy.

    Args:
        root (str): Folder to create; it must not exist yet.
        num_train (int): Images in the train split. Defaults to 200.
        num_val (int): Images in the val split. Defaults to 50.
        img_size (int): Side of the square images, >= 32. Defaults to 256.
        seed (int): Seed of the random generator. Defaults to 0.
        min_shapes (int): Fewest shapes per image. Defaults to 1.
        max_shapes (int): Most shapes per image, <= 10. Defaults to 3.

    Returns:
        str: ``root``.
    """
    args = dict(
        num_train=num_train,
        num_val=num_val,
        img_size=img_size,
        seed=seed,
        min_shapes=min_shapes,
        max_shapes=max_shapes)
    _check_args(**args)
    if osp.exists(root):
        raise FileExistsError(f'{root} already exists; remove it to '
                              'generate the shapes data set again')
    num_images = dict(zip(SPLITS, (num_train, num_val)))

    def write(tmp_root: str) -> None:
        for split, count in num_images.items():
            write_split(tmp_root, split, count, img_size, seed, min_shapes,
                        max_shapes)
        _write_json(osp.join(tmp_root, 'generation.json'), args)
        _write_manifest(tmp_root, num_images)

    _write_atomically(root, write)
    return root


def _generation_args(**kwargs) -> dict:
    """All arguments of :func:`generate_shapes` but ``root``, validated."""
    bound = inspect.signature(generate_shapes).bind('', **kwargs)
    bound.apply_defaults()
    args = dict(bound.arguments)
    del args['root']
    _check_args(**args)
    return args


def ensure_shapes(root: str, **kwargs) -> str:
    """Generate the shapes data set at ``root`` unless it exists already.

    Stale temporary folders of earlier runs are removed first (see the
    module docstring). An existing ``root`` is checked against its manifest:
    when incomplete or damaged, it is generated again with a warning naming
    the problem, unless it holds files the generator does not write (an
    error says what to do then). A complete ``root`` is used as it is; a
    warning tells when it was generated with other arguments than
    ``kwargs``.

    Args:
        root (str): Folder of the data set.
        **kwargs: Arguments of :func:`generate_shapes`.

    Returns:
        str: ``root``.
    """
    args = _generation_args(**kwargs)
    # A symbolic link is followed: its target is checked and replaced.
    folder = osp.realpath(root)
    _remove_stale_temporaries(folder)
    damage = find_damage(folder) if osp.exists(folder) else None
    if damage:
        _remove_damaged(folder, damage)
    try:
        generate_shapes(folder, **args)
    except FileExistsError:  # complete, or created by another process
        _warn_if_generated_differently(folder, args)
    return root


def _remove_damaged(root: str, damage: str) -> None:
    """Delete the damaged ``root`` unless it holds files of someone else.

    ``root`` is renamed to a temporary sibling first: a kill during the
    deletion leaves a stale temporary folder, not a damaged ``root``.

    Raises:
        RuntimeError: ``root`` holds files the generator does not write.
    """
    try:
        foreign = sorted(set(os.listdir(root)) - _LAYOUT)
        if foreign:
            raise RuntimeError(
                f'{root} is incomplete or damaged ({damage}) and also holds '
                f'{", ".join(foreign)}, which the shapes generator does not '
                f'write; move those away, then delete {root}: the shapes '
                'data set is generated again on the next run')
        warnings.warn(
            f'{root} is incomplete or damaged ({damage}); generating the '
            'shapes data set again', UserWarning)
        trash = _temporary_path(root)
        os.rename(root, trash)
    except FileNotFoundError:
        return  # another process removed it first
    shutil.rmtree(trash, ignore_errors=True)


def _warn_if_generated_differently(root: str, args: dict) -> None:
    """Warn when ``root/generation.json`` records other arguments."""
    record = osp.join(root, 'generation.json')
    if not osp.isfile(record):
        return
    with open(record) as f:
        used = json.load(f)
    if used != args:
        warnings.warn(
            f'{root} was generated with {used}, not {args}; delete it to '
            'generate the shapes data set again', UserWarning)
