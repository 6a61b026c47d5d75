"""Which torch release is installed, for the features that some releases
allowed by ``setup.cfg`` lack (docs/compatibility.md)."""
import torch
from mmengine.utils import digit_version


def torch_before(version: str) -> bool:
    """Whether the installed torch is older than ``version``."""
    return digit_version(torch.__version__) < digit_version(version)
