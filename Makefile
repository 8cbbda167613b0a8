# fedfs: two commands from a fresh clone.
#   make demo   creates .venv, installs fedfs, runs the demo federation on a local folder
#   make test   creates .venv, installs fedfs + test tools (+ Samba, Chromium via apt), runs the suite
#   make bench  runs every benchmark's quick form and rewrites docs/benchmarks.md
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.fedfs-installed
PYTEST_ARGS ?=

.PHONY: demo test venv system-deps bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing fedfs, nnU-Net and torch into $(VENV) ..."
	@$(PIP) install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
	@$(PY) -c "import fedfs, torch, nnunetv2, moto, s3fs, smbprotocol, pytest" || (echo "install failed" >&2; exit 1)
	@touch $(STAMP)

# Samba for the SMB backend tests (a real server on a loopback port) and Chromium for the
# report's browser test. Missing tools make those tests fail with the reason, never skip.
system-deps:
	@missing=""; command -v smbd >/dev/null 2>&1 || missing="$$missing samba"; \
	  command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	  if [ -n "$$missing" ]; then echo "installing$$missing (apt-get) ..."; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	    || echo "could not install$$missing: the tests that need them will fail with the reason" >&2; fi

demo: $(STAMP)
	$(VENV)/bin/fedfs demo

test: $(STAMP) system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

# Every benchmark in its quick form: JSON under benchmarks/results/, tables in docs/benchmarks.md.
bench: $(STAMP) system-deps
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
