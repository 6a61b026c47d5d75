#!/usr/bin/env bash
# One-command set-up: a virtual environment at .venv/ with the pinned
# OpenMMLab stack and agent_mm installed in editable mode.
#
# Environment knobs:
#   PYTHON        interpreter that creates the venv (default: python3)
#   TORCH_SPEC    torch requirement when no torch is available (default: torch==2.13.0)
#   TORCH_INDEX_URL  extra index that torch itself comes from (default: PyTorch's
#                 CPU index when no NVIDIA GPU is visible and FORCE_CUDA is not 1,
#                 none otherwise; set it empty for pip's own choice). PyPI's Linux
#                 torch wheels are CUDA builds of several GB.
#   FORCE_CUDA    1/0 to force building mmcv's CUDA ops on/off (default: auto)
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

python_bin=${PYTHON:-python3}
venv=.venv
torch_spec=${TORCH_SPEC:-torch==2.13.0}

log() { printf '[install] %s\n' "$*"; }

if [ ! -x "$venv/bin/python" ]; then
  # Reuse a torch that the base interpreter already has (e.g. a CUDA build).
  if "$python_bin" -c 'import torch' >/dev/null 2>&1; then
    log "creating $venv with access to the torch of $python_bin"
    "$python_bin" -m venv --system-site-packages "$venv"
  else
    log "creating $venv"
    "$python_bin" -m venv "$venv"
  fi
fi
py="$repo_root/$venv/bin/python"
pip() { "$py" -m pip install --disable-pip-version-check "$@"; }

# mmcv 2.1.0's setup.py imports pkg_resources (setuptools < 81); torch 2.13 wants >= 77.0.3.
pip -U pip 'setuptools>=77,<81' wheel ninja

if "$py" -c 'import torch' >/dev/null 2>&1; then
  log "keeping installed torch $("$py" -c 'import torch; print(torch.__version__)')"
else
  if [ -z "${TORCH_INDEX_URL+set}" ]; then
    TORCH_INDEX_URL=
    if [ "${FORCE_CUDA:-}" != 1 ] && ! nvidia-smi -L >/dev/null 2>&1; then
      TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
    fi
  fi
  if [ -n "$TORCH_INDEX_URL" ]; then
    # torch alone from that index (pip prefers its +cpu build), then its
    # dependencies from the indexes pip is configured with
    log "installing $torch_spec from $TORCH_INDEX_URL"
    pip --no-deps --extra-index-url "$TORCH_INDEX_URL" "$torch_spec"
  fi
  log "installing $torch_spec"
  pip "$torch_spec"
fi

pip 'mmengine==0.10.7'

# pip caches the wheel it builds under mmcv's name alone, whatever torch it was
# built against: tools/check_mmcv.py tells when the installed ops do not fit this
# torch (or lack CUDA), and then the wheel is built afresh, bypassing the cache.
cuda=${FORCE_CUDA:-$("$py" -c 'import torch; print(int(torch.cuda.is_available()))')}
check_mmcv=("$py" tools/check_mmcv.py)
if [ "$cuda" = 1 ]; then check_mmcv+=(--cuda); fi
build_mmcv() {
  MMCV_WITH_OPS=1 FORCE_CUDA="$cuda" MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    pip --no-build-isolation "$@" 'mmcv==2.1.0'
}
if "${check_mmcv[@]}" 2>/dev/null; then
  log "mmcv 2.1.0 with ops already installed"
else
  log "installing mmcv 2.1.0 with ops (FORCE_CUDA=$cuda): built from source the first time, then from pip's cache"
  build_mmcv
  if ! "${check_mmcv[@]}"; then
    log "that mmcv was built for another torch or without CUDA (pip's cached wheel): building it again without the cache"
    build_mmcv --no-cache-dir --force-reinstall --no-deps
    "${check_mmcv[@]}" || { log "mmcv's ops still do not load (above); nothing more to try"; exit 1; }
  fi
fi

# mmseg 1.2.2 imports ftfy and regex without declaring them.
pip 'mmdet==3.3.0' 'mmsegmentation==1.2.2' ftfy regex

# openmim without its opendatalab/openxlab tail (it pins setuptools~=60.2 and
# old requests/rich/tqdm; mim's train/test/run never import it).
pip --no-deps 'openmim==0.3.9'
pip click colorama model-index pandas requests rich tabulate

# the deploy extra (ONNX export and ONNX Runtime, about 8 s and 125 MB)
# lets the export tests run instead of skipping
pip --no-build-isolation -e '.[tests,deploy]'

# mim looks for <site-packages>/agent_mm/.mim; a PEP 660 editable install
# keeps the package in the repo, so point that path at it.
site_packages=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ ! -e "$site_packages/agent_mm" ]; then
  ln -s "$repo_root/agent_mm" "$site_packages/agent_mm"
fi

"$py" -c 'import agent_mm, mmdet, mmseg, mmcv.ops; print("agent_mm stack ready")'
