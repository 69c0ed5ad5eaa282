# Included by every experiment's Makefile: the same targets as the FlexOS artifact's.
ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))/../..)
PYTHON ?= $(ROOT)/.venv/bin/python
RUN := PYTHONPATH=$(ROOT) $(PYTHON) experiment.py

.PHONY: all prepare run plot smoke clean
all: prepare run plot
prepare:
	$(RUN) prepare
run:
	$(RUN) run
plot:
	$(RUN) plot
smoke:
	$(RUN) all --smoke --out $(or $(OUT),plots-smoke)
clean:
	rm -rf plots-smoke
