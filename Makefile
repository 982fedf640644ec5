# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install bench soak clean

$(BIN)/twistd: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/twistd

install: $(BIN)/twistd

demo: install
	$(BIN)/python demo/run.py

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

# Not part of `make test`: a minute of mixed http/tcp/redis load through one ambassador
# whose members fail on a seeded schedule; exits non-zero if the books do not balance.
soak: install
	$(BIN)/python tests/chaos/soak.py --seconds $(or $(SOAK_SECONDS),60)

bench: install
	$(BIN)/python bench/tcp_throughput.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info twisted/plugins/dropin.cache
