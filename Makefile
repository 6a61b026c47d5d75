.PHONY: install test test-quick lint

# One command to set up: .venv/ with torch, mmengine, mmcv (with ops), mmdet, mmseg, mim and agent_mm.
install:
	bash tools/install.sh

# Test processes (pytest-xdist); each runs torch on its share of the cores.
TEST_WORKERS ?= 2

# One command to test: the whole suite in .venv.
test:
	.venv/bin/python -m pytest tests -n $(TEST_WORKERS) --dist worksteal

# The inner loop: everything but the end-to-end runs marked slow.
test-quick:
	.venv/bin/python -m pytest tests -n $(TEST_WORKERS) --dist worksteal -m "not slow"

# flake8 and isort over the whole tree (settings in setup.cfg).
lint:
	.venv/bin/flake8 agent_mm tools tests configs setup.py
	.venv/bin/isort --check-only --diff agent_mm tools tests configs setup.py
