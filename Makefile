# khod -- two commands for a new machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test lint demo bench vm-test clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing khod and its test tools into $(VENV) (log: $(VENV)/install.log)"
	@$(PY) -m pip install --disable-pip-version-check -e '.[test]' > $(VENV)/install.log 2>&1 \
		|| { cat $(VENV)/install.log; exit 1; }
	@touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest -q

demo: $(STAMP)
	$(PY) -m khoexamples.demo

# khod across real kexecs of Linux in a QEMU guest (vm/vmtest.py; needs root, qemu-system-x86,
# debootstrap, e2fsprogs; caches in /var/cache/khod-vm). About 6.5 min cold, 4-5 min cached, under TCG.
vm-test: $(STAMP)
	$(PY) -m vm.vmtest

bench: $(STAMP)
	$(PY) bench/format.py --json
	$(PY) bench/rpc.py --json
	$(PY) bench/fairness.py --json
	$(PY) bench/memory.py --json
	$(PY) bench/warm.py --json
	$(PY) bench/blackout.py --json

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
