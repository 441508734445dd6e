# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The pinned CPU wheel of torch first, so nothing pulls the CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0 || $(PY) -m pip install --quiet torch
	$(PY) -m pip install --quiet -e ".[demo,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/saeforge demo

PEERS := benchmarks/.venv-peers

test: $(STAMP)
	# The dashboard's browser tests need headless Chromium (Debian's packages; we run as root).
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver)
	$(PY) -m pytest -q -ra
	# saeforge <-> SAELens against the real sae-lens, in its own venv (it cannot share ours: see peer_venv.py)
	$(PY) benchmarks/peer_venv.py --venv $(PEERS) --extra pytest
	PYTHONPATH=src $(PEERS)/bin/python -m pytest -q -ra -p no:cacheprovider tests/interop/test_saelens_real.py

clean:
	rm -rf $(VENV) runs out
