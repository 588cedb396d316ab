# Set-up and entry points. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: setup browser demo test bench clean

setup: $(STAMP) browser

# The review page's end-to-end tests drive Debian's chromium through its chromedriver; a missing
# browser fails those tests, so set-up installs it (root on CI and dev machines; sudo elsewhere).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }

# torch==2.13.0 first: it is the CPU wheel on these machines; a bare `torch`
# requirement resolved later would otherwise download a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/alseg demo

test: setup
	$(BIN)/python -m pytest -q --durations=25

# The speed benchmarks (minutes, on a quiet machine); the studies are in docs/benchmarks.md with their commands.
bench: setup
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/mc_scoring.py --json
	$(BIN)/python benchmarks/mc_growth.py --json --figure docs/figures/mc-growth.png

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
