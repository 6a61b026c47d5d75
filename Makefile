.PHONY: install test

# One command to set up: .venv/ with torch, mmengine, mmcv (with ops), mmdet, mmseg, mim and agent_mm.
install:
	bash tools/install.sh

# One command to test: the whole suite in .venv.
test:
	.venv/bin/python -m pytest tests
