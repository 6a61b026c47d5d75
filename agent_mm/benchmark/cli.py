"""Command-line pieces shared by ``benchmark_backbones.py`` and
``profile_backbones.py``: input sizes and the options of how models run
(precisions, threads, seed, the size of the product for the GEMM rate)."""
import argparse
import os
from typing import Iterable, Sequence

from .measure import MATMUL_SIZE
from .models import DTYPES, FLOAT32, Size, check_dtypes


def parse_size(text: str) -> Size:
    """``'512'`` → ``(512, 512)``; ``'800x1333'`` → ``(800, 1333)`` (H×W)."""
    parts = text.lower().split('x')
    if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(
            f'size must be N or HxW (e.g. 512, 800x1333), got {text!r}')
    height, width = int(parts[0]), int(parts[-1])
    return height, width


def positive_int(text: str) -> int:
    """An argparse type: an integer ≥ 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be ≥ 1, got {value}')
    return value


def available_cores() -> int:
    """Cores this process may run on."""
    if hasattr(os, 'sched_getaffinity'):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def add_dtype_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--dtype`` (stored as ``dtypes``) to ``parser``; check it with
    :func:`check_dtype_option` after parsing."""
    parser.add_argument(
        '--dtype',
        dest='dtypes',
        nargs='+',
        choices=list(DTYPES),
        default=[FLOAT32],
        metavar='DTYPE',
        help='precisions, one or several of ' + ', '.join(DTYPES) +
        ' (default: float32); the others run the forward under '
        'torch.autocast with float32 parameters')


def add_agent_model_options(parser: argparse.ArgumentParser,
                            choices: Iterable[str], sizes: Sequence[Size],
                            repeats: int) -> None:
    """Add ``--models`` (keys of ``choices``; default Agent-PVT-T and
    Agent-Swin-T), ``--sizes`` (default ``sizes``) and ``--repeats``
    (default ``repeats``) to ``parser``."""
    parser.add_argument(
        '--models',
        nargs='+',
        default=['agent_pvt_t', 'agent_swin_t'],
        choices=list(choices))
    parser.add_argument(
        '--sizes', nargs='+', type=parse_size, default=list(sizes))
    parser.add_argument('--repeats', type=int, default=repeats)


def add_host_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--threads`` and ``--seed`` to ``parser``."""
    parser.add_argument(
        '--threads',
        type=int,
        default=available_cores(),
        help='torch.set_num_threads (default: all cores, %(default)s)')
    parser.add_argument('--seed', type=int, default=0)


def add_matmul_size_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--matmul-size`` (≥ 1), the side of the product that gives the
    GEMM rate."""
    parser.add_argument(
        '--matmul-size',
        type=positive_int,
        default=MATMUL_SIZE,
        help='side of the square torch.mm timed in each precision for the '
        'GEMM roofline (default: %(default)s; smaller on a CPU that '
        'emulates bfloat16, where a 2048³ product takes minutes)')


def check_dtype_option(parser: argparse.ArgumentParser,
                       args: argparse.Namespace) -> None:
    """Exit through ``parser.error`` if ``--dtype`` repeats a value."""
    try:
        check_dtypes(args.dtypes)
    except ValueError as error:
        parser.error(f'--dtype: {error}')
