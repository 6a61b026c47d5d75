"""Hooks imported by the configs of the multi-process tests."""
import os.path as osp

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module()
class SaveRankWeightsHook(Hook):
    """Save every rank's final parameters (and the kinds of batch norm in
    the model) as ``rank{r}.pth`` in the work dir."""

    def after_run(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(
            runner.model) else runner.model
        norms = sorted({
            type(m).__name__
            for m in model.modules() if 'BatchNorm' in type(m).__name__
        })
        params = {k: v.detach() for k, v in model.named_parameters()}
        torch.save({'params': params, 'norms': norms},
                   osp.join(runner.work_dir, f'rank{get_rank()}.pth'))
