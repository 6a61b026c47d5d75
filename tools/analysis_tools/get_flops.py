"""Parameters and FLOPs of a detector or segmentor built from a config.

The codebase (mmdet or mmseg) is taken from the config's ``default_scope``.
The backbone's ``init_cfg`` is dropped and weights are never initialised
from files, so no checkpoint is needed. The model runs once in ``tensor``
mode (features and head outputs, no post-processing) on a random image of
``--shape`` HEIGHT WIDTH and is traced by mmengine's ``FlopAnalyzer`` (one
multiply-add = one flop) with the attention handles of
:mod:`agent_mm.utils.flops`, so fused attention is counted.

Defaults follow the paper: 1280×800 images for detection (``--shape 800
1280``, H×W) and 2048×512 for ADE20K segmentation (``--shape 512 2048``).
For two-stage detectors the RoI heads run on the RPN proposals of the random
image, so their FLOPs depend on it a little; the backbone's do not.

Example::

    python tools/analysis_tools/get_flops.py \
        configs/agent_pvt/retinanet_agent-pvt-t_fpn_1x_coco.py
"""
import argparse
import importlib
from functools import partial
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import init_default_scope

from agent_mm.engine.runtime import add_cfg_options, config_from_file
from agent_mm.utils.flops import flop_analyzer, top_level_flops

DEFAULT_SHAPES = {'mmdet': (800, 1280), 'mmseg': (512, 2048)}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Parameters and FLOPs of an mmdet/mmseg model')
    parser.add_argument('config', help='config file path')
    parser.add_argument(
        '--shape',
        type=int,
        nargs='+',
        help='input HEIGHT [WIDTH]; default 800 1280 (detection) or 512 '
        '2048 (segmentation)')
    add_cfg_options(parser, 'model.backbone.arch=small')
    args = parser.parse_args(argv)
    if args.shape is not None and len(args.shape) not in (1, 2):
        parser.error('--shape takes HEIGHT or HEIGHT WIDTH')
    return args


def load_config(path: str, options: Optional[dict]) -> Tuple[Config, str]:
    """The config with overrides and without backbone weights, and its
    codebase scope."""
    cfg = config_from_file(path, options)
    # mmdet when unset, as in the train, test, infer and export tools
    scope = cfg.get('default_scope', 'mmdet')
    if scope not in DEFAULT_SHAPES:
        raise ValueError(
            f'{path}: default_scope must be one of {sorted(DEFAULT_SHAPES)}, '
            f'got {scope!r}; set default_scope in the config to the '
            'codebase that builds its model')
    cfg.model.backbone.init_cfg = None
    if 'pretrained' in cfg.model:
        cfg.model.pretrained = None
    return cfg, scope


def build_model(cfg: Config, scope: str) -> nn.Module:
    """The model in eval mode (SyncBN reverted to BN for the CPU)."""
    init_default_scope(scope)
    registry = importlib.import_module(f'{scope}.registry').MODELS
    return revert_sync_batchnorm(registry.build(cfg.model)).eval()


def data_samples(scope: str, shape: Tuple[int, int]) -> Optional[list]:
    """Meta information a detector's tensor-mode forward reads (RPN
    proposals are cropped to the image); segmentors need none."""
    if scope != 'mmdet':
        return None
    from mmdet.structures import DetDataSample
    meta = dict(
        img_shape=shape,
        ori_shape=shape,
        pad_shape=shape,
        batch_input_shape=shape,
        scale_factor=(1., 1.))
    return [DetDataSample(metainfo=meta)]


def complexity(model: nn.Module, scope: str, shape: Tuple[int, int]) -> dict:
    """Params and FLOPs of one tensor-mode forward at ``shape`` (H, W)."""
    device = next(model.parameters()).device
    inputs = torch.randn(1, 3, *shape, device=device)
    model.forward = partial(
        model.forward, data_samples=data_samples(scope, shape), mode='tensor')
    with torch.no_grad():
        analyzer = flop_analyzer(model, (inputs, ))
        flops = analyzer.total()
    return dict(
        shape=list(shape),
        params=sum(p.numel() for p in model.parameters()),
        flops=int(flops),
        flops_by_part=top_level_flops(analyzer),
        unsupported_ops=dict(analyzer.unsupported_ops()))


def report(config: str, result: dict) -> List[str]:
    height, width = result['shape']
    lines = [
        f'Config: {config}', f'Input: {height}×{width} (H×W)',
        f"Params: {result['params'] / 1e6:.2f} M",
        f"FLOPs: {result['flops'] / 1e9:.2f} G (one multiply-add = one flop)"
    ]
    lines += [
        f'  {name}: {flops / 1e9:.2f} G'
        for name, flops in result['flops_by_part']
    ]
    if result['unsupported_ops']:
        ops = ', '.join(sorted(result['unsupported_ops']))
        lines.append(f'Not counted (element-wise or unknown ops): {ops}')
    return lines


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Print and return params and FLOPs of ``config``."""
    args = parse_args(argv)
    cfg, scope = load_config(args.config, args.cfg_options)
    shape = DEFAULT_SHAPES[scope]
    if args.shape:
        shape = (args.shape[0], args.shape[-1])
    result = complexity(build_model(cfg, scope), scope, shape)
    print('\n'.join(report(args.config, result)))
    return result


if __name__ == '__main__':
    main()
