"""Inference on user files with mmdet's / mmseg's inferencers.

Importing this package does not import mmdet or mmseg; building a predictor
imports the codebase of its config.
"""
from .inference import (InputError, Predictor, Summary, build_predictor,
                        read_image, run_inference)

__all__ = [
    'InputError', 'Predictor', 'Summary', 'build_predictor', 'read_image',
    'run_inference'
]
