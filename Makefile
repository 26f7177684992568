# Two commands: `make run` (the main job on its defaults) and `make test` (the suite).
# Both create .venv and install lca into it when missing or when pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install clean

# The main job: passkey retrieval with ring attention (zigzag layout) on a (data=2,
# sequence=4) mesh of 8 emulated CPU devices (configs/passkey.py sets them before JAX
# starts). Benchmarks run on their own: python experiments/bench.py [--quick] [--part ...].
run: $(STAMP)
	$(PY) experiments/train.py --config configs/passkey.py --workdir out/passkey

# Two pytest workers (pytest-xdist): the tests are mostly single-threaded XLA compiles.
test: $(STAMP)
	$(PY) -m pytest -q -n 2

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) out .pytest_cache
