"""tools/install.sh's mmcv step, run with a stand-in interpreter (no pip,
no build), and tools/check_mmcv.py on the installed stack."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK_MMCV = REPO / 'tools' / 'check_mmcv.py'

# Stands in for .venv/bin/python: logs its arguments, "installs" mmcv by
# recording whether the wheel fits this torch (a build that bypasses pip's
# cache always does, unless FAKE_BUILD_BROKEN) and answers the script's
# one-line questions.
FAKE_PYTHON = textwrap.dedent('''\
    #!{python}
    import json, os, sys
    state = os.environ['FAKE_STATE']
    args = sys.argv[1:]
    with open(os.path.join(state, 'calls'), 'a') as calls:
        calls.write(json.dumps(args) + '\\n')
    mmcv = os.path.join(state, 'mmcv')
    if args[:3] == ['-m', 'pip', 'install'] and 'mmcv==2.1.0' in args:
        fits = ('--no-cache-dir' in args
                or os.environ.get('FAKE_CACHED_WHEEL') == 'fits')
        if os.environ.get('FAKE_BUILD_BROKEN'):
            fits = False
        with open(mmcv, 'w') as f:
            f.write('fits' if fits else 'stale')
    elif args[:1] == ['tools/check_mmcv.py']:
        if not (os.path.exists(mmcv) and open(mmcv).read() == 'fits'):
            print('mmcv does not import: undefined symbol', file=sys.stderr)
            sys.exit(1)
    elif args[:1] == ['-c'] and 'sysconfig' in args[1]:
        print(os.path.join(state, 'site-packages'))
    elif args[:1] == ['-c'] and 'cuda.is_available' in args[1]:
        print(0)
    elif args[:1] == ['-c'] and '__version__' in args[1]:
        print('2.6.0')
    ''')


def run_install(tmp_path: Path, mmcv_installed: str = '', **extra) -> tuple:
    """Run a copy of tools/install.sh whose venv interpreter is the stand-in.

    Returns:
        The finished process and the stand-in's calls (argument lists).
    """
    repo, state = tmp_path / 'repo', tmp_path / 'state'
    (repo / 'tools').mkdir(parents=True)
    (state / 'site-packages').mkdir(parents=True)
    shutil.copy(REPO / 'tools' / 'install.sh', repo / 'tools')
    python = repo / '.venv' / 'bin' / 'python'
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON.format(python=sys.executable))
    python.chmod(0o755)
    if mmcv_installed:
        (state / 'mmcv').write_text(mmcv_installed)
    env = {k: v for k, v in os.environ.items() if k != 'FORCE_CUDA'}
    env.update(FAKE_STATE=str(state), **extra)
    done = subprocess.run(['bash', str(repo / 'tools' / 'install.sh')],
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=60)
    calls = [json.loads(line) for line in (state / 'calls').open()]
    return done, calls


def mmcv_installs(calls: list) -> list:
    """The stand-in's pip installs of mmcv."""
    return [c for c in calls if c[:3] == ['-m', 'pip', 'install']
            and 'mmcv==2.1.0' in c]


def checks(calls: list) -> list:
    return [c for c in calls if c[:1] == ['tools/check_mmcv.py']]


def test_a_cached_wheel_built_for_another_torch_is_built_again(tmp_path):
    done, calls = run_install(tmp_path, FAKE_CACHED_WHEEL='stale')
    assert done.returncode == 0, done.stderr
    first, second = mmcv_installs(calls)
    assert '--no-cache-dir' not in first
    assert {'--no-cache-dir', '--force-reinstall', '--no-deps'} <= set(second)
    assert 'built for another torch' in done.stdout
    assert any('mmdet==3.3.0' in c for c in calls)  # and the rest ran


def test_a_wheel_that_fits_is_installed_once(tmp_path):
    done, calls = run_install(tmp_path, FAKE_CACHED_WHEEL='fits')
    assert done.returncode == 0, done.stderr
    assert len(mmcv_installs(calls)) == 1
    assert 'built for another torch' not in done.stdout


def test_an_installed_mmcv_that_fits_is_kept(tmp_path):
    done, calls = run_install(tmp_path, mmcv_installed='fits')
    assert done.returncode == 0, done.stderr
    assert mmcv_installs(calls) == []
    assert 'mmcv 2.1.0 with ops already installed' in done.stdout


def test_an_installed_mmcv_that_does_not_fit_is_replaced(tmp_path):
    # pip would call the installed 2.1.0 satisfied: the forced build runs
    done, calls = run_install(
        tmp_path, mmcv_installed='stale', FAKE_CACHED_WHEEL='stale')
    assert done.returncode == 0, done.stderr
    assert '--force-reinstall' in mmcv_installs(calls)[-1]


def test_the_install_stops_when_the_fresh_build_does_not_load(tmp_path):
    done, calls = run_install(tmp_path, FAKE_BUILD_BROKEN='1')
    assert done.returncode == 1
    assert 'undefined symbol' in done.stderr
    assert "mmcv's ops still do not load" in done.stdout
    assert not any('mmdet==3.3.0' in c for c in calls)


def test_cuda_builds_ask_for_cuda_ops(tmp_path):
    done, calls = run_install(
        tmp_path, FAKE_CACHED_WHEEL='fits', FORCE_CUDA='1')
    assert done.returncode == 0, done.stderr
    assert checks(calls) and all(c[1:] == ['--cuda'] for c in checks(calls))
    done, calls = run_install(tmp_path / 'cpu', FAKE_CACHED_WHEEL='fits')
    assert checks(calls) and all(c[1:] == [] for c in checks(calls))


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK_MMCV), *args],
                          capture_output=True,
                          text=True,
                          timeout=120)


def test_check_mmcv_accepts_the_installed_stack():
    done = run_check()
    assert (done.returncode, done.stderr) == (0, '')


def test_check_mmcv_cuda_follows_how_the_ops_were_built():
    from mmcv.ops import get_compiling_cuda_version
    built_with_cuda = get_compiling_cuda_version() != 'not available'
    done = run_check('--cuda')
    assert done.returncode == (0 if built_with_cuda else 1)
    if not built_with_cuda:
        assert "mmcv's ops were built without CUDA" in done.stderr


@pytest.mark.parametrize('version, message', [
    ('2.2.0', 'mmcv 2.2.0 is installed, not 2.1.0'),
    (None, 'mmcv does not import: '),
])
def test_check_mmcv_names_the_problem(monkeypatch, version, message):
    import importlib.util

    import mmcv
    spec = importlib.util.spec_from_file_location('check_mmcv', CHECK_MMCV)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    if version is None:  # the ops fail to load, as with another torch
        monkeypatch.setitem(sys.modules, 'mmcv.ops', None)
    else:
        monkeypatch.setattr(mmcv, '__version__', version)
    assert tool.mmcv_problem(need_cuda=False).startswith(message)
