"""Run a detector or segmentor on images, folders of images and videos.

The codebase is taken from the config's ``default_scope`` (``mmdet`` or
``mmseg``): mmdet's ``DetInferencer`` or mmseg's ``MMSegInferencer`` runs
the model. For each input, ``OUT_DIR/vis/<name>.png`` (a video:
``<name>.avi``) shows the predictions and ``OUT_DIR/preds/<name>.json``
holds them (detection: label, class, score, box and COCO RLE mask per
instance; segmentation: label, class, area and COCO RLE mask per class
present). Usable directly or as ``mim run agent_mm infer``::

    python tools/infer.py CONFIG CHECKPOINT img.jpg photos/ clip.mp4 \\
        --out-dir results

A missing, unreadable or corrupt input is reported on one line with the
reason and the others still run; folder entries that are not images or videos,
subfolders (not searched) and folders holding no image or video are skipped
and reported. An input that fails or is interrupted leaves no partial output.
The exit status is 0 if at least one input was done, 1 if none
was (every input failed, or there was nothing to run on).
"""
import argparse
import sys
from typing import Optional, Sequence

from agent_mm.apis import build_predictor, run_inference
from agent_mm.engine.runtime import add_cfg_options, config_from_file
from agent_mm.utils import keep_freed_memory


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Predict on images, folders and videos (mmdet or mmseg '
        'config)',
        epilog='Exit status: 0 if at least one input was done, 1 if none.')
    parser.add_argument('config', help='config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        'inputs',
        nargs='+',
        help='image files, folders of images (and videos) and video files')
    parser.add_argument(
        '--out-dir',
        required=True,
        help='where vis/ (pictures, videos) and preds/ (JSON) are written')
    parser.add_argument(
        '--device', help='cpu, cuda:0, ... (default: a GPU if there is one)')
    parser.add_argument(
        '--score-thr',
        type=float,
        default=0.3,
        help='detection: instances scored below it are not drawn (the JSON '
        'holds them all)')
    add_cfg_options(parser, 'model.test_cfg.rcnn.max_per_img=20')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the batch; return the exit status. Freed memory stays in the
    process for the next inputs (:func:`keep_freed_memory`)."""
    args = parse_args(argv)
    keep_freed_memory()
    cfg = config_from_file(args.config, args.cfg_options)
    predictor = build_predictor(
        cfg, args.checkpoint, device=args.device, score_thr=args.score_thr)
    summary = run_inference(predictor, args.inputs, args.out_dir)
    print(summary.report())
    print(f'Results in {args.out_dir}')
    return 0 if summary.done else 1


if __name__ == '__main__':
    sys.exit(main())
