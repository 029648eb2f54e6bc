# khod -- two commands for a new machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# Manual pages and shell completions, built from the parsers and config/khod.toml
# by tools/gendata.py into the venv's share/ (man and bash-completion look there,
# beside its bin/); `make install-data` puts them under $(DESTDIR)$(PREFIX).
DATA_SRC   := tools/gendata.py config/khod.toml khod/main.py khod/startup.py khod/config.py \
	clients/khoclient/ctl.py
DATA_STAMP := $(VENV)/.data-stamp
PREFIX     ?= /usr/local

CBUILD ?= build/c

.PHONY: install install-data test lint demo bench vm-test clean c

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing khod and its test tools into $(VENV) (log: $(VENV)/install.log)"
	@$(PY) -m pip install --disable-pip-version-check -e '.[test,data]' > $(VENV)/install.log 2>&1 \
		|| { cat $(VENV)/install.log; exit 1; }
	@touch $(STAMP)

$(DATA_STAMP): $(STAMP) $(DATA_SRC)
	@$(PY) tools/gendata.py --prefix $(VENV) > /dev/null
	@touch $@

install: $(STAMP) $(DATA_STAMP)

install-data: $(STAMP)
	$(PY) tools/gendata.py --prefix $(DESTDIR)$(PREFIX)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint $(DATA_STAMP)
	$(VENV)/bin/pytest -q

demo: $(STAMP)
	$(PY) -m khoexamples.demo

# the C client (clients/c): library, pkg-config file, example and test programs
c:
	$(MAKE) -C clients/c BUILD=$(abspath $(CBUILD))

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
	$(PY) bench/c_client.py --json

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis $(CBUILD)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
