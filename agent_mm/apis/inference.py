"""Run a detector or segmentor on images, folders and videos.

Built on mmdet's ``DetInferencer`` and mmseg's ``MMSegInferencer`` (chosen
from the config's ``default_scope``): they build the model, load the
checkpoint, turn the test pipeline into one for in-memory images and set up
the visualizer. This module adds what a batch over user files needs:

* every input is read here, so a missing, unreadable or corrupt file is
  reported by name with the reason, and the rest of the batch still runs;
  grayscale and RGBA images are converted to 3 channels;
* a folder stands for its image and video files; its other entries,
  subfolders included (they are not searched), are skipped and reported, and
  so is a folder holding no image or video file;
* a video is read frame by frame with ``cv2.VideoCapture`` and written back
  annotated (Motion-JPEG in an ``.avi``, which needs no extra codec);
* checkpoints whose weight names do not match the model are refused, as
  ``tools/test.py`` does (the inferencers load them non-strictly).

Outputs in ``out_dir``: ``vis/<name>.png`` (or ``vis/<name>.avi``), the input
with its predictions drawn, and ``preds/<name>.json``, the predictions; a
name taken by an earlier input of the batch gets a ``_1``, ``_2``... suffix.
Each output is written to a hidden temporary file in its folder and renamed
into place once complete (the JSON first, then the picture or video): an
input that fails or is interrupted midway leaves no partial file.
"""
import json
import os
import os.path as osp
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import (BinaryIO, Callable, Dict, Iterator, List, Optional, Tuple,
                    Union)

import cv2
import numpy as np
import torch.nn as nn
from mmengine.config import Config
from mmengine.infer import BaseInferencer
from mmengine.structures import BaseDataElement
from pycocotools import mask as mask_utils
from rich.console import Console
from rich.progress import Progress

from ..engine.checkpoint_hook import temporary_path
from ..engine.checkpoint_match import checkpoint_mismatch

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.ppm', '.pgm', '.tif',
                    '.tiff', '.webp')
VIDEO_EXTENSIONS = ('.avi', '.mp4', '.mov', '.mkv', '.m4v', '.mpg', '.mpeg',
                    '.webm', '.wmv')
# frames per second of an annotated video whose input does not say
DEFAULT_FPS = 25.0


class InputError(Exception):
    """An input that cannot be read; the message says why."""


def os_reason(err: OSError) -> str:
    """An OS error's reason, e.g. ``'permission denied'``."""
    reason = err.strerror or str(err)
    return reason[:1].lower() + reason[1:]


class MatchedWeights:
    """Inferencer mix-in: refuse a checkpoint whose weight names do not match
    the model (the inferencers load checkpoints non-strictly)."""

    def _init_model(self, cfg: Config, weights: Optional[str],
                    device: str = 'cpu') -> nn.Module:
        """Remember the checkpoint's name for the error message."""
        self.weights = weights
        return super()._init_model(cfg, weights, device)

    def _load_weights_to_model(self, model: nn.Module,
                               checkpoint: Optional[dict],
                               cfg: Config) -> None:
        """Check the weight names, then load as the inferencer does.

        Raises:
            ValueError: The checkpoint's weight names do not match the
                model's.
        """
        if checkpoint is not None:
            source = f'Checkpoint {self.weights!r}'
            message = checkpoint_mismatch(model, checkpoint, source)
            if message is not None:
                raise ValueError(message + ' Is it a checkpoint of another '
                                 'model or arch?')
        super()._load_weights_to_model(model, checkpoint, cfg)


class Predictor:
    """Predictions and their drawing for one image, through an inferencer.

    Args:
        inferencer: A ``DetInferencer`` or ``MMSegInferencer``.
        score_thr: Detection: instances scored below it are not drawn (the
            JSON holds them all, as mmdet's inferencer writes them).
    """

    def __init__(self, inferencer: BaseInferencer,
                 score_thr: float = 0.3) -> None:
        self.inferencer = inferencer
        self.score_thr = score_thr
        self.classes = inferencer.model.dataset_meta.get('classes') or ()

    @staticmethod
    def inferencer_class() -> type:
        """The inferencer of the codebase."""
        raise NotImplementedError

    def records(self, sample: BaseDataElement) -> List[dict]:
        """The predictions of a data sample as JSON-serialisable dicts."""
        raise NotImplementedError

    def draw(self, name: str, rgb: np.ndarray,
             sample: BaseDataElement) -> None:
        """Draw the predictions of ``sample`` on ``rgb`` in the visualizer."""
        raise NotImplementedError

    def class_name(self, label: int) -> str:
        """The class name of a label (the label itself if it has none)."""
        return str(self.classes[label]) if label < len(
            self.classes) else str(label)

    def __call__(self, name: str,
                 image: np.ndarray) -> Tuple[List[dict], np.ndarray]:
        """Predict on a BGR image; return the predictions as dicts and the
        image with them drawn (BGR)."""
        inferencer = self.inferencer
        data = inferencer.collate_fn([inferencer.pipeline(image)])
        sample = inferencer.forward(data)[0]
        self.draw(name, np.ascontiguousarray(image[..., ::-1]), sample)
        drawn = inferencer.visualizer.get_image()[..., ::-1]
        return self.records(sample), np.ascontiguousarray(drawn)


class DetPredictor(Predictor):
    """Instances (label, class, score, box, RLE mask) of a detector."""

    @staticmethod
    def inferencer_class() -> type:
        """mmdet's ``DetInferencer``."""
        from mmdet.apis import DetInferencer
        return DetInferencer

    def records(self, sample: BaseDataElement) -> List[dict]:
        """One dict per instance: ``label``, ``class``, ``score``, ``bbox``
        (x1, y1, x2, y2 in pixels) and ``mask`` (COCO RLE) if predicted."""
        columns = self.inferencer.pred2dict(sample)
        records = []
        for i, label in enumerate(columns['labels']):
            record = {
                'label': label,
                'class': self.class_name(label),
                'score': columns['scores'][i],
                'bbox': columns['bboxes'][i]
            }
            if 'masks' in columns:
                record['mask'] = columns['masks'][i]
            records.append(record)
        return records

    def draw(self, name: str, rgb: np.ndarray,
             sample: BaseDataElement) -> None:
        """Boxes and masks scored at least ``score_thr``."""
        self.inferencer.visualizer.add_datasample(
            name, rgb, sample, draw_gt=False, pred_score_thr=self.score_thr)


class SegPredictor(Predictor):
    """Classes present in a segmentor's label map, each with its area and
    COCO RLE mask."""

    def __init__(self, inferencer: BaseInferencer,
                 score_thr: float = 0.3) -> None:
        super().__init__(inferencer, score_thr)
        inferencer.visualizer.set_dataset_meta(**inferencer.model.dataset_meta)

    @staticmethod
    def inferencer_class() -> type:
        """mmseg's ``MMSegInferencer``."""
        from mmseg.apis import MMSegInferencer
        return MMSegInferencer

    def records(self, sample: BaseDataElement) -> List[dict]:
        """One dict per class in the label map: ``label``, ``class``,
        ``area`` (pixels) and ``mask`` (COCO RLE)."""
        label_map = sample.pred_sem_seg.data[0].cpu().numpy()
        records = []
        for label in np.unique(label_map).tolist():
            mask = np.asfortranarray(label_map == label, dtype=np.uint8)
            rle = mask_utils.encode(mask)
            rle['counts'] = rle['counts'].decode()
            records.append({
                'label': label,
                'class': self.class_name(label),
                'area': int(mask.sum()),
                'mask': rle
            })
        return records

    def draw(self, name: str, rgb: np.ndarray,
             sample: BaseDataElement) -> None:
        """The label map in the classes' colours over the image."""
        self.inferencer.visualizer.add_datasample(
            name, rgb, sample, draw_gt=False)


PREDICTORS = {'mmdet': DetPredictor, 'mmseg': SegPredictor}


def build_predictor(config: Union[str, Config],
                    checkpoint: str,
                    device: Optional[str] = None,
                    score_thr: float = 0.3) -> Predictor:
    """The predictor of a config's codebase (``default_scope``: ``mmdet``, the
    default, or ``mmseg``) with the checkpoint's weights.

    Args:
        config: A config file or a loaded config.
        checkpoint: The model's weights; their names must match the model.
        device: ``'cpu'``, ``'cuda:0'``...; None picks a GPU if there is one.
        score_thr: Detection only: instances scored below it are not drawn.

    Raises:
        ValueError: The config is of another codebase, or the checkpoint's
            weight names do not match the model.
    """
    cfg = config if isinstance(config, Config) else Config.fromfile(config)
    scope = cfg.get('default_scope', 'mmdet')
    if scope not in PREDICTORS:
        raise ValueError(f'default_scope={scope!r}: inference supports '
                         f'{sorted(PREDICTORS)} configs.')
    predictor_class = PREDICTORS[scope]

    class Inferencer(MatchedWeights, predictor_class.inferencer_class()):
        """The codebase's inferencer, refusing mismatched checkpoints."""

    inferencer = Inferencer(
        model=cfg, weights=checkpoint, device=device, scope=scope)
    inferencer.show_progress = False
    return predictor_class(inferencer, score_thr=score_thr)


def open_input(path: str) -> BinaryIO:
    """The file open for reading.

    Raises:
        InputError: It cannot be opened (missing, no permission...).
    """
    try:
        return open(path, 'rb')
    except OSError as err:
        raise InputError(os_reason(err)) from err


def read_image(path: str) -> np.ndarray:
    """A BGR ``uint8`` image with 3 channels (grayscale and RGBA converted).

    Raises:
        InputError: The file cannot be read or is not a decodable image.
    """
    with open_input(path) as f:
        data = f.read()
    if not data:
        raise InputError('empty file')
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise InputError('not a decodable image: corrupt, or a format '
                         'OpenCV cannot read')
    return image


def open_video(path: str) -> cv2.VideoCapture:
    """A capture positioned at the first frame.

    Raises:
        InputError: The file cannot be read or opened as a video.
    """
    open_input(path).close()
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise InputError('not a video OpenCV can open: corrupt, or a codec '
                         'it lacks')
    return capture


def video_frames(capture: cv2.VideoCapture) -> Iterator[np.ndarray]:
    """The frames of a video (BGR) until the first one that cannot be
    decoded."""
    while True:
        ok, frame = capture.read()
        if not ok:
            return
        yield frame


@dataclass
class Summary:
    """What a batch did: inputs done, failed and skipped (with reasons).

    Args:
        say: Announces each failed or skipped input on one line.
    """
    say: Callable[[str], None] = print
    done: List[str] = field(default_factory=list)
    failed: List[Tuple[str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    def fail(self, path: str, reason: str) -> None:
        """Record and announce an input that failed."""
        self.failed.append((path, reason))
        self.say(f'failed {path}: {reason}')

    def skip(self, path: str, reason: str) -> None:
        """Record and announce an input left out."""
        self.skipped.append((path, reason))
        self.say(f'skipped {path}: {reason}')

    def report(self) -> str:
        """One line of counts, then one line per failed or skipped input."""
        lines = [f'{len(self.done)} done, {len(self.failed)} failed, '
                 f'{len(self.skipped)} skipped']
        lines += [f'failed {path}: {why}' for path, why in self.failed]
        lines += [f'skipped {path}: {why}' for path, why in self.skipped]
        return '\n'.join(lines)


def has_extension(path: str, extensions: Tuple[str, ...]) -> bool:
    """Whether ``path`` ends with one of ``extensions`` (any case)."""
    return osp.splitext(path)[1].lower() in extensions


def folder_files(folder: str, summary: Summary) -> List[str]:
    """The image and video files of a folder (sorted).

    Its other entries, subfolders included (they are not searched), are
    skipped in ``summary``, and so is the folder if it holds no image or
    video file.

    Raises:
        OSError: The folder cannot be listed.
    """
    files = []
    for entry in sorted(os.listdir(folder)):
        entry = osp.join(folder, entry)
        if osp.isdir(entry):
            summary.skip(entry, 'a folder (subfolders are not searched)')
        elif has_extension(entry, IMAGE_EXTENSIONS + VIDEO_EXTENSIONS):
            files.append(entry)
        else:
            summary.skip(entry, 'not an image or video file')
    if not files:
        summary.skip(folder, 'a folder holding no image or video file')
    return files


def expand_inputs(paths: List[str], summary: Summary) -> List[str]:
    """The files to run on: each path, or the image and video files of a
    folder (see :func:`folder_files`). Unreadable folders are failed in
    ``summary``."""
    files = []
    for path in paths:
        if not osp.isdir(path):
            files.append(path)
            continue
        try:
            files += folder_files(path, summary)
        except OSError as err:
            summary.fail(path, os_reason(err))
    return files


class OutputNames:
    """Output names in the batch, unique: the input's name without its
    extension, with ``_1``, ``_2``... appended when taken."""

    def __init__(self) -> None:
        self.taken: Dict[str, int] = {}

    def __call__(self, path: str) -> str:
        stem = osp.splitext(osp.basename(path))[0]
        name = stem
        while name in self.taken:
            self.taken[stem] += 1
            name = f'{stem}_{self.taken[stem]}'
        self.taken[name] = 0
        return name


@contextmanager
def written_in_place(*paths: str) -> Iterator[Tuple[str, ...]]:
    """Temporary paths, each in its ``paths`` entry's folder, to write those
    files to, all or none.

    The files there are renamed into place when the block ends; if the
    block or a rename raises (``KeyboardInterrupt`` included; the exception
    goes on), the temporary files and those already renamed are deleted.
    The names keep the extension (``.<name>.tmp.avi``), by which OpenCV
    chooses its writer. Renaming makes the outputs whole or absent, not
    durable (no flush to the disk, which would slow a batch of many
    images).
    """
    tmp_paths = tuple(
        temporary_path(stem) + extension
        for stem, extension in map(osp.splitext, paths))
    placed = []
    try:
        yield tmp_paths
        for tmp_path, path in zip(tmp_paths, paths):
            os.replace(tmp_path, path)
            placed.append(path)
    except BaseException:
        for path in (*tmp_paths, *placed):
            with suppress(FileNotFoundError):
                os.remove(path)
        raise


def write_json(path: str, record: dict) -> None:
    """``record`` as JSON in ``path``."""
    with open(path, 'w') as f:
        json.dump(record, f)


def video_writer(path: str, fps: float, width: int,
                 height: int) -> cv2.VideoWriter:
    """A Motion-JPEG writer of ``path`` (an ``.avi``).

    Raises:
        OSError: OpenCV cannot write it.
    """
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*'MJPG'), fps,
                             (width, height))
    if not writer.isOpened():
        raise OSError(f'OpenCV cannot write {path}')
    return writer


class BatchRunner:
    """Writes pictures and JSON for images and videos with a predictor.

    Args:
        predictor: The model.
        out_dir: Outputs go to ``out_dir/vis`` and ``out_dir/preds``.
        progress: The progress display (a task per video's frames).
    """

    def __init__(self, predictor: Predictor, out_dir: str,
                 progress: Progress) -> None:
        self.predictor = predictor
        self.vis_dir = osp.join(out_dir, 'vis')
        self.preds_dir = osp.join(out_dir, 'preds')
        os.makedirs(self.vis_dir, exist_ok=True)
        os.makedirs(self.preds_dir, exist_ok=True)
        self.progress = progress
        self.names = OutputNames()

    def preds_path(self, name: str) -> str:
        """The JSON file of the output ``name``."""
        return osp.join(self.preds_dir, name + '.json')

    def run(self, path: str) -> None:
        """Predict on an image or a video file.

        Raises:
            InputError: The file cannot be read.
        """
        if has_extension(path, VIDEO_EXTENSIONS):
            self.run_video(path)
        else:
            self.run_image(path)

    def run_image(self, path: str) -> None:
        """``vis/<name>.png`` and ``preds/<name>.json`` of an image; neither
        if writing fails."""
        image = read_image(path)
        records, drawn = self.predictor(osp.basename(path), image)
        name = self.names(path)
        picture = osp.join(self.vis_dir, name + '.png')
        with written_in_place(picture, self.preds_path(name)) as (
                tmp_picture, tmp_json):
            if not cv2.imwrite(tmp_picture, drawn):
                raise OSError(f'OpenCV cannot write {picture}')
            height, width = image.shape[:2]
            write_json(
                tmp_json,
                dict(input=path, height=height, width=width,
                     predictions=records))

    def run_video(self, path: str) -> None:
        """``vis/<name>.avi`` and ``preds/<name>.json`` (predictions per
        frame) of a video; neither if a frame or writing fails."""
        capture = open_video(path)
        fps = capture.get(cv2.CAP_PROP_FPS) or DEFAULT_FPS
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        name = self.names(path)
        task = self.progress.add_task(
            osp.basename(path), total=count if count > 0 else None)
        video = osp.join(self.vis_dir, name + '.avi')
        try:
            with written_in_place(video, self.preds_path(name)) as (
                    tmp_video, tmp_json):
                frames, height, width = self.write_video(
                    path, capture, tmp_video, fps, task)
                write_json(
                    tmp_json,
                    dict(input=path, height=height, width=width, fps=fps,
                         frames=frames))
        finally:
            capture.release()
            self.progress.remove_task(task)

    def write_video(self, path: str, capture: cv2.VideoCapture, video: str,
                    fps: float, task: int) -> Tuple[List[dict], int, int]:
        """Write the frames of ``capture``, annotated, to ``video``.

        Args:
            path: The input, as the predictor names it.
            capture: From :func:`open_video`.
            video: The Motion-JPEG ``.avi`` file to write.
            fps: Frames per second of ``video``.
            task: The progress task advanced at each frame.

        Returns:
            tuple: The predictions of each frame (``frame``, ``predictions``),
            the frames' height and width.

        Raises:
            InputError: No frame could be decoded.
        """
        writer, frames = None, []
        try:
            for index, frame in enumerate(video_frames(capture)):
                records, drawn = self.predictor(osp.basename(path), frame)
                if writer is None:
                    height, width = frame.shape[:2]
                    writer = video_writer(video, fps, width, height)
                writer.write(drawn)
                frames.append(dict(frame=index, predictions=records))
                self.progress.advance(task)
        finally:
            if writer is not None:
                writer.release()
        if not frames:
            raise InputError('no frame could be decoded')
        return frames, height, width


def run_inference(predictor: Predictor,
                  paths: List[str],
                  out_dir: str,
                  console: Optional[Console] = None) -> Summary:
    """Predict on images, folders of images and videos, with a progress bar.

    A missing, unreadable or corrupt input (or one the model fails on) is
    announced on one line naming it and why, and the batch goes on.

    Args:
        predictor: From :func:`build_predictor`.
        paths: Image files, video files and folders of them.
        out_dir: Where ``vis/`` (pictures, videos) and ``preds/`` (JSON) go.
        console: Where the progress and the messages go (default: stderr).

    Returns:
        Summary: The inputs done, failed and skipped.
    """
    console = console or Console(stderr=True)
    summary = Summary(say=partial(
        console.print, markup=False, highlight=False, soft_wrap=True))
    with Progress(console=console) as progress:
        files = expand_inputs(paths, summary)
        runner = BatchRunner(predictor, out_dir, progress)
        for path in progress.track(files, description='Inference'):
            try:
                runner.run(path)
            except Exception as err:  # report it; the batch goes on
                summary.fail(
                    path,
                    str(err) if isinstance(err, InputError) else
                    f'{type(err).__name__}: {err}')
            else:
                summary.done.append(path)
    return summary
