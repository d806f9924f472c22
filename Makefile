# One task runner: `make demo` (first run installs everything), `make test` (what .ci/run calls).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BUF_VERSION := 1.75.0
BUF    := .tools/node_modules/.bin/buf

.PHONY: install system-deps demo devnet gen check-gen lint test test-quick mutation-check bench clean

install: $(VENV)/.installed $(BUF)

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# What the tests need from Debian: a headless browser and its driver (tests/explorer) and a
# PostgreSQL server (the PostgreSQL store's tests start one: initdb + pg_ctl). Installed when
# missing and we are root (CI on a fresh machine); otherwise the tests that need them fail saying
# what to install.
system-deps:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null || \
	    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null; }; \
	  else echo "missing Debian packages:$$missing (apt-get install them as root; the tests that need them fail)"; fi; \
	fi

$(BUF):
	npm install --prefix .tools --no-save --no-audit --no-fund --loglevel=error @bufbuild/buf@$(BUF_VERSION)

demo: $(VENV)/.installed
	$(VENV)/bin/aitbc demo

devnet: $(VENV)/.installed
	$(VENV)/bin/aitbc devnet

gen: $(VENV)/.installed
	$(PY) scripts/gen_protos.py

# CI: regenerate the stubs and fail when the committed ones differ
check-gen: gen
	@git diff --exit-code --stat -- aitbc/v1 || { echo "generated stubs are stale: run 'make gen' and commit"; exit 1; }
	@test -z "$$(git status --porcelain --untracked-files=all -- aitbc/v1)" || { git status --short -- aitbc/v1; echo "generated stubs are not committed: run 'make gen' and commit"; exit 1; }

lint: $(BUF) $(VENV)/.installed
	$(BUF) lint
	$(BUF) format --diff --exit-code
	$(PY) -m ruff check .

test: install system-deps check-gen lint
	$(PY) -m pytest -q
	$(PY) scripts/mutation_check.py

# every safety rule in tests/mutations/rules.toml has a test that fails without it (part of `make test`)
mutation-check: $(VENV)/.installed
	$(PY) scripts/mutation_check.py

test-quick: install system-deps
	$(PY) -m pytest -q -m "not slow"

bench: $(VENV)/.installed
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .tools build *.egg-info
