.PHONY: install test test-quick lint

# One command to set up: .venv/ with torch, mmengine, mmcv (with ops), mmdet, mmseg, mim and agent_mm.
install:
	bash tools/install.sh

# Test processes (pytest-xdist); each runs torch on its share of the cores.
# Tests are handed out one at a time, the end-to-end ones first (see
# tests/conftest.py), so that the workers finish together.
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS) --dist load --maxschedchunk 1

# One command to test: the whole suite in .venv.
test:
	.venv/bin/python -m pytest tests $(XDIST)

# The inner loop: everything but the end-to-end runs marked slow.
test-quick:
	.venv/bin/python -m pytest tests $(XDIST) -m "not slow"

# flake8 and isort over the whole tree (settings in setup.cfg).
lint:
	.venv/bin/flake8 agent_mm tools tests configs setup.py
	.venv/bin/isort --check-only --diff agent_mm tools tests configs setup.py
