"""Packaging glue; the metadata lives in setup.cfg.

Like mmdet, the package carries ``configs/``, ``tools/`` and
``model-index.yml`` under ``agent_mm/.mim`` so that ``mim train agent_mm``,
``mim test agent_mm`` and ``mim run agent_mm`` find them: as symlinks for an
editable install, as copies for a wheel or sdist.
"""
import os
import os.path as osp
import shutil
import sys
from setuptools import setup

MIM_FILES = ('configs', 'tools', 'model-index.yml')


def add_mim_extension() -> None:
    """Expose configs and tools inside the package for OpenMMLab's mim."""
    if {'develop', 'editable_wheel'} & set(sys.argv):
        mode = 'symlink'
    elif {'sdist', 'bdist_wheel', 'install'} & set(sys.argv):
        mode = 'copy'
    else:
        return

    root = osp.dirname(osp.abspath(__file__))
    mim_dir = osp.join(root, 'agent_mm', '.mim')
    os.makedirs(mim_dir, exist_ok=True)
    for name in MIM_FILES:
        src = osp.join(root, name)
        dst = osp.join(mim_dir, name)
        if osp.islink(dst) or osp.isfile(dst):
            os.remove(dst)
        elif osp.isdir(dst):
            shutil.rmtree(dst)
        if not osp.exists(src):
            continue
        if mode == 'symlink':
            os.symlink(osp.relpath(src, mim_dir), dst)
        elif osp.isdir(src):
            shutil.copytree(src, dst)
        else:
            shutil.copyfile(src, dst)


if __name__ == '__main__':
    add_mim_extension()
    setup()
