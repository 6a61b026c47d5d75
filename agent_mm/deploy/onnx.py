"""Export agent_mm models to ONNX and check them in ONNX Runtime.

What is exported is chosen from the config's ``default_scope``: an mmseg
config gives the whole segmentor (normalised images in, the decode head's
logits out, as its ``tensor`` mode), any other config (mmdet) the backbone
(normalised images in, the feature maps out). The data preprocessor
(normalisation, padding) is not part of the graph.

The exporter is PyTorch's dynamo-based one (``torch.export`` then
``torch.onnx``); agent attention takes its export branch by itself while it
is traced (:mod:`agent_mm.models.traced_agent_attention`). Needs the
``deploy`` extra: ``pip install -e '.[deploy]'``.
"""
import os
import os.path as osp
import shutil
import statistics
import tempfile
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import fuse_conv_bn
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import MODELS, init_default_scope
from mmengine.runner import load_checkpoint
from mmengine.utils import mkdir_or_exist
from torch import Tensor

from agent_mm.utils.timing import interleaved_times
from agent_mm.utils.versions import torch_before

if TYPE_CHECKING:  # the deploy extra, imported where it is used
    import onnxruntime

DEPLOY_EXTRA = "pip install -e '.[deploy]'"
# ONNX Runtime must give PyTorch's float32 outputs within this
TOLERANCE = 1e-4
# a graph with dynamic sizes is also checked at its size plus these (H, W)
DYNAMIC_CHECK_OFFSET = (32, 64)
# PyTorch 2.6's ONNX exporter fails on a bilinear resize to sizes of the
# graph ("SymIntArrayRef expected to contain only concrete integers") and,
# with the deploy extra's onnxscript, on eval-mode batch norm; 2.7.1
# exports both
DYNAMIC_EXPORT_TORCH = BATCHNORM_EXPORT_TORCH = '2.7.0'
# ONNX Runtime's session setting for busy-waiting of its threads between runs
ORT_SPINNING = 'session.intra_op.allow_spinning'


class OrtRunError(RuntimeError):
    """ONNX Runtime could not run a graph, e.g. on a size that the trace
    fixed."""


def require_deploy_extra() -> None:
    """Raise an ``ImportError`` naming the extra if onnx, onnxscript or
    onnxruntime is missing."""
    for name in ('onnx', 'onnxscript', 'onnxruntime'):
        try:
            __import__(name)
        except ImportError as err:
            raise ImportError(f'Exporting to ONNX needs {name}: install the '
                              f'deploy extra, {DEPLOY_EXTRA}') from err


def require_dynamic_export() -> None:
    """Raise a ``RuntimeError`` naming the fix if this PyTorch cannot export
    dynamic sizes (:data:`DYNAMIC_EXPORT_TORCH`)."""
    if torch_before(DYNAMIC_EXPORT_TORCH):
        raise RuntimeError(
            f'exporting dynamic sizes needs torch >= {DYNAMIC_EXPORT_TORCH} '
            f'(torch {torch.__version__} cannot export the resizing of the '
            f'position biases to sizes of the graph): upgrade torch, or '
            f'export a fixed size without --dynamic')


class SegmentorLogits(nn.Module):
    """A segmentor's ``tensor`` mode: normalised images ``(B, 3, H, W)`` to
    the decode head's logits (at its own resolution, usually ``H/4``)."""

    def __init__(self, segmentor: nn.Module) -> None:
        super().__init__()
        self.segmentor = segmentor

    def forward(self, inputs: Tensor) -> Tensor:
        return self.segmentor(inputs, mode='tensor')


class TracedUpsample(nn.Module):
    """mmseg's ``Upsample`` by a whole factor, with the output size computed
    in integers: mmseg's ``int(side * factor)`` fixes the size of a traced
    graph at the traced one, which breaks dynamic sizes."""

    def __init__(self, factor: int, mode: str,
                 align_corners: Optional[bool]) -> None:
        super().__init__()
        self.factor = factor
        self.mode = mode
        self.align_corners = align_corners

    def forward(self, x: Tensor) -> Tensor:
        size = [side * self.factor for side in x.shape[-2:]]
        return F.interpolate(
            x, size=size, mode=self.mode, align_corners=self.align_corners)


def trace_friendly_upsampling(model: nn.Module) -> None:
    """Replace, in place, mmseg's ``Upsample`` layers that scale by a whole
    factor with the equal :class:`TracedUpsample`."""
    from mmseg.models.utils import Upsample
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, Upsample) and _whole_factor(child):
                setattr(
                    parent, name,
                    TracedUpsample(
                        int(child.scale_factor), child.mode,
                        child.align_corners))


def _whole_factor(upsample: nn.Module) -> bool:
    """Whether an mmseg ``Upsample`` scales by one whole factor."""
    factor = upsample.scale_factor
    return (not upsample.size and isinstance(factor, float)
            and factor.is_integer())


def check_checkpoint(checkpoint: str) -> None:
    """Raise a ``FileNotFoundError`` naming ``checkpoint`` and the fix if it
    is not a file (URLs are not downloaded)."""
    if not osp.isfile(checkpoint):
        raise FileNotFoundError(
            f'checkpoint {checkpoint!r} not found (URLs are not downloaded); '
            'give an existing file, or omit the checkpoint to export '
            'randomly initialised weights')


def check_output(path: str) -> None:
    """Make sure the ONNX file ``path`` can be written, before exporting,
    without creating anything: its directory, or the nearest one of its
    parents that exists (:func:`save_whole` creates the missing ones, like
    mmengine's ``work_dir``), must be a writable directory.

    Args:
        path: The ONNX file to write (an existing file is replaced).

    Raises:
        OSError: ``path`` is a directory, or its directory cannot be created
            or written to; the message names ``path``.
    """
    if not osp.basename(path) or osp.isdir(path):
        raise IsADirectoryError(
            f'output {path!r} is not a file name; give one such as '
            f'{osp.join(path, "model.onnx")!r}')
    parent = osp.dirname(osp.abspath(path))
    existing = parent
    while not osp.exists(existing):
        existing = osp.dirname(existing)
    if not osp.isdir(existing):
        raise NotADirectoryError(
            f'output {path!r}: {existing!r} is not a directory; give a path '
            'in a directory')
    try:
        # what save_whole needs: a directory of its own in there
        os.rmdir(tempfile.mkdtemp(prefix='.onnx-export-', dir=existing))
    except OSError as err:
        raise type(err)(
            f'cannot write the output {path!r} in {parent!r} '
            f'({err.strerror or err}); give a path in a writable '
            'directory') from err


def build_export_model(config: Config,
                       checkpoint: Optional[str] = None) -> nn.Module:
    """The part of ``config``'s model to export, in eval mode on the CPU.

    The model is built in the config's ``default_scope``; nothing is
    downloaded (``init_cfg`` is not applied). Without a checkpoint the
    weights stay random, with a warning. SyncBN layers become BN, and
    mmseg's upsampling layers :class:`TracedUpsample`. On a torch that
    cannot export batch norm (:data:`BATCHNORM_EXPORT_TORCH`) each
    convolution and the BN after it are fused into one convolution.

    Args:
        config: An mmdet or mmseg config (``custom_imports`` already done).
        checkpoint: A checkpoint file of the whole model (strictly loaded).

    Returns:
        :class:`SegmentorLogits` for an mmseg config, else the backbone.

    Raises:
        FileNotFoundError: ``checkpoint`` is given but is not a file (raised
            before the model is built).
    """
    if checkpoint:
        check_checkpoint(checkpoint)
    scope = config.get('default_scope', 'mmdet')
    init_default_scope(scope)
    model = revert_sync_batchnorm(MODELS.build(config.model))
    if checkpoint:
        load_checkpoint(model, checkpoint, map_location='cpu', strict=True)
    else:
        warnings.warn('No checkpoint given: exporting randomly initialised '
                      'weights.')
    if scope != 'mmseg':
        return model.backbone.eval()
    trace_friendly_upsampling(model)
    segmentor = SegmentorLogits(model).eval()
    if torch_before(BATCHNORM_EXPORT_TORCH):
        fuse_conv_bn(segmentor)
    return segmentor


def output_names(model: nn.Module, inputs: Tensor) -> List[str]:
    """``logits``, or ``out0``, ``out1``... for a tuple of feature maps."""
    with torch.no_grad():
        outputs = model(inputs)
    if isinstance(outputs, Tensor):
        return ['logits']
    return [f'out{i}' for i in range(len(outputs))]


def math_attention(query: Tensor,
                   key: Tensor,
                   value: Tensor,
                   attn_mask: Optional[Tensor] = None,
                   dropout_p: float = 0.,
                   is_causal: bool = False,
                   scale: Optional[float] = None,
                   enable_gqa: bool = False) -> Tensor:
    """``scaled_dot_product_attention`` of any rank as plain operations
    (the exporter's own translation takes 4-D inputs only; Swin's window
    attention has 5-D ones). Inference only: no dropout, no causal mask."""
    if dropout_p or is_causal or enable_gqa:
        raise ValueError('Only inference attention (no dropout, causal mask '
                         'or grouped queries) is exported.')
    if scale is None:
        scale = query.shape[-1]**-0.5
    logits = (query * scale) @ key.transpose(-2, -1)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        logits = logits.masked_fill(~attn_mask, float('-inf'))
    elif attn_mask is not None:
        logits = logits + attn_mask
    return logits.softmax(dim=-1) @ value


def export_onnx(model: nn.Module,
                inputs: Tensor,
                path: str,
                dynamic: bool = False) -> List[str]:
    """Export ``model`` on ``inputs`` to the ONNX file ``path``.

    ``path`` is checked first (:func:`check_output`), and written only
    whole: see :func:`save_whole`.

    Args:
        model: The module in eval mode, one image batch in.
        inputs: Example input ``(B, 3, H, W)``.
        path: Output file (the weights inside it, or beside it in
            ``<name>.data`` for a model over 2 GB: :func:`save_whole`).
        dynamic: Height and width as dynamic dimensions.

    Returns:
        The names of the graph's outputs.

    Raises:
        OSError: ``path`` cannot be written (raised before exporting).
        RuntimeError: ``dynamic`` on a PyTorch that cannot export it
            (:func:`require_dynamic_export`).
    """
    require_deploy_extra()
    if dynamic:
        require_dynamic_export()
    check_output(path)
    names = output_names(model, inputs)
    dims = torch.export.Dim.DYNAMIC
    shapes = ({2: dims, 3: dims}, ) if dynamic else None
    with torch.no_grad():
        # non-strict: PyTorch's default from 2.7 on (2.6 traced with dynamo)
        program = torch.export.export(model, (inputs, ),
                                      dynamic_shapes=shapes,
                                      strict=False)
    attention = torch.ops.aten.scaled_dot_product_attention.default
    if any(node.target is attention for node in program.graph.nodes):
        program = program.run_decompositions({attention: math_attention})
    onnx_program = torch.onnx.export(
        program,
        input_names=['input'],
        output_names=names,
        dynamo=True)
    save_whole(onnx_program, path)
    return names


def save_whole(onnx_program: 'torch.onnx.ONNXProgram', path: str) -> None:
    """Save an exported program to ``path`` so that a failure leaves no
    partial file: it is written in a temporary directory beside ``path``
    (same file system; the directory of ``path`` is created if missing),
    then renamed into place, with its external data file ``<name>.data`` if
    it has one (a model over 2 GB), the graph last."""
    parent = osp.dirname(osp.abspath(path))
    mkdir_or_exist(parent)
    staging = tempfile.mkdtemp(prefix='.onnx-export-', dir=parent)
    try:
        onnx_program.save(osp.join(staging, osp.basename(path)))
        graph_last = sorted(
            os.listdir(staging), key=lambda name: name == osp.basename(path))
        for name in graph_last:
            os.replace(osp.join(staging, name), osp.join(parent, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass
class Check:
    """ONNX Runtime against PyTorch on one input.

    Attributes:
        shape: The input's shape.
        max_error: Largest absolute difference over all outputs.
        ort_ms: Median ONNX Runtime latency (None if not timed).
        eager_ms: Median PyTorch eager latency (no autograd; None if not
            timed).
    """
    shape: Tuple[int, ...]
    max_error: float
    ort_ms: Optional[float] = None
    eager_ms: Optional[float] = None

    @property
    def ok(self) -> bool:
        """Whether the outputs agree within :data:`TOLERANCE`."""
        return self.max_error <= TOLERANCE

    @property
    def ratio(self) -> Optional[float]:
        """ONNX Runtime latency over PyTorch eager latency."""
        if self.ort_ms is None or self.eager_ms is None:
            return None
        return self.ort_ms / self.eager_ms


def ort_session(path: str) -> 'onnxruntime.InferenceSession':
    """An ONNX Runtime CPU session of the file ``path`` running on PyTorch's
    number of threads.

    Its threads sleep as soon as a run ends (:data:`ORT_SPINNING` is
    ``'0'``): by default they keep spinning for a while after each run, and
    on a machine with few cores they take them from the PyTorch call that
    :func:`check_onnx` times next, which made PyTorch look slower than it
    is alone.
    """
    require_deploy_extra()
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry(ORT_SPINNING, '0')
    return onnxruntime.InferenceSession(
        path, options, providers=['CPUExecutionProvider'])


def check_onnx(model: nn.Module,
               path: str,
               inputs: Tensor,
               repeats: int = 0) -> Check:
    """Run the exported file and ``model`` on ``inputs``; compare, and time
    both ``repeats`` times, alternating (0: no timing), each on PyTorch's
    number of threads."""
    session = ort_session(path)
    feed: Dict[str, np.ndarray] = {'input': inputs.numpy()}

    def eager() -> Sequence[Tensor]:
        with torch.no_grad():
            outputs = model(inputs)
        return (outputs, ) if isinstance(outputs, Tensor) else outputs

    def ort() -> List[np.ndarray]:
        try:
            return session.run(None, feed)
        # onnxruntime's errors derive from Exception alone
        except Exception as err:
            raise OrtRunError(str(err)) from err

    error = max(
        float(np.abs(ours - theirs.numpy()).max())
        for ours, theirs in zip(ort(), eager()))
    check = Check(tuple(inputs.shape), error)
    if repeats:  # both ran once above: warm
        times = interleaved_times(dict(ort=ort, eager=eager), 0, repeats,
                                  torch.device('cpu'))
        check.ort_ms, check.eager_ms = (1000 * statistics.median(times[key])
                                        for key in ('ort', 'eager'))
    return check


def check_shapes(shape: Tuple[int, int],
                 dynamic: bool) -> List[Tuple[int, int]]:
    """The input sizes to check a graph at: the exported one, and a larger
    one if its sizes are dynamic."""
    sizes = [tuple(shape)]
    if dynamic:
        sizes.append(tuple(s + d for s, d in zip(shape, DYNAMIC_CHECK_OFFSET)))
    return sizes
