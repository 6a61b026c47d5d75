"""Check that the installed mmcv has its C++ ops built for the torch beside
it: ``tools/install.sh`` runs it after installing mmcv.

pip caches the wheel it builds from mmcv's source under the source's name
alone, whatever torch it was built against. A venv made again with another
torch (a CUDA build installed first, say) is then handed the old wheel,
whose ops fail to load (``undefined symbol``) or lack the CUDA kernels.
Exit status 0 if the ops load (and, with ``--cuda``, were compiled with
CUDA), else 1 with the reason on stderr.
"""
import argparse
import sys

MMCV_VERSION = '2.1.0'


def mmcv_problem(need_cuda: bool) -> str:
    """What is wrong with the installed mmcv for this torch, or ''."""
    try:
        import mmcv
        from mmcv.ops import get_compiling_cuda_version
    except ImportError as error:  # also mmcv's ops built for another torch
        return f'mmcv does not import: {error}'
    if mmcv.__version__ != MMCV_VERSION:
        return f'mmcv {mmcv.__version__} is installed, not {MMCV_VERSION}'
    if need_cuda and get_compiling_cuda_version() == 'not available':
        return "mmcv's ops were built without CUDA"
    return ''


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--cuda',
        action='store_true',
        help='also require the ops to be compiled with CUDA')
    problem = mmcv_problem(parser.parse_args().cuda)
    if problem:
        print(problem, file=sys.stderr)
    return 1 if problem else 0


if __name__ == '__main__':
    sys.exit(main())
