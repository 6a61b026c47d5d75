"""Quick-start configs shrunk to a tiny generated shapes set, for tests that
run the real tools."""
import os.path as osp

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
QUICKSTART = osp.join(REPO, 'configs', 'quickstart')
DET_CONFIG = 'mask-rcnn_agent-pvt-t_fpn_shapes.py'
SEG_CONFIG = 'fpn_agent-pvt-t_shapes.py'
TINY_SIZE = 64  # pixels of the tiny set's square images
TINY_DATA = f'dict(num_train=8, num_val=4, img_size={TINY_SIZE}, seed=1)'


def loaders(val_dataset: str = '', size: int = TINY_SIZE) -> str:
    """Config text of in-process loaders over the tiny set, whose pipelines
    fit the images in ``size`` x ``size``.

    Args:
        val_dataset (str): More keys of the validation (and test) data set,
            as ``key=value, ...`` text; e.g. to evaluate on the training
            images.
        size (int): Side of the square that the ``Resize`` steps fit the
            images in: the generated images' size by default (the configs
            resize to 224 or 128 pixels, a step of several times the cost).
    """
    val = f', {val_dataset}' if val_dataset else ''
    return f'''
train_dataloader = dict(
    num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, generate=generate,
                 pipeline={_fitted('train', size)}))
val_dataloader = dict(
    num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, generate=generate{val},
                 pipeline={_fitted('val', size)}))
test_dataloader = val_dataloader
'''


def _fitted(split: str, size: int) -> str:
    """Config text of the base config's ``split`` pipeline with its
    ``Resize`` steps at ``size`` x ``size``."""
    return (f'[dict(step, scale=({size}, {size})) '
            "if step.type == 'Resize' else step "
            f'for step in _base_.{split}_dataloader.dataset.pipeline]')


LOADERS = loaders()

DET_OVERRIDES = LOADERS + '''
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator
train_cfg = dict(max_epochs=1, val_interval=1)
'''

SEG_OVERRIDES = LOADERS + f'''
model = dict(data_preprocessor=dict(size=({TINY_SIZE}, {TINY_SIZE})))
train_cfg = dict(max_iters=2, val_interval=2)
default_hooks = dict(checkpoint=dict(interval=2))
'''


def tiny_config(tmp_path, base: str, overrides: str,
                data: str = TINY_DATA) -> str:
    """Write ``base`` (a quick-start config name) with its data under
    ``tmp_path / 'shapes'`` and ``overrides`` appended; return its path."""
    data_root = str(tmp_path / 'shapes') + '/'
    path = tmp_path / osp.basename(base)
    path.write_text(f'_base_ = {osp.join(QUICKSTART, base)!r}\n'
                    f'data_root = {data_root!r}\n'
                    f'generate = {data}\n' + overrides)
    return str(path)
