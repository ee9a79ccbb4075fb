# The README's front door: `make run` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install run test lint format bench profile postgres-bin clean torture deploy-check

install: $(STAMP)

# twistd finds the twisted/plugins/dache_plugin.py dropin by scanning
# twisted/plugins folders on sys.path, and setuptools' editable install does not
# put the checkout there: a .pth file does.
$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench]'
	echo "$(CURDIR)" > "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/dache-checkout.pth"
	$(BIN)/twistd --help | grep -q ' dache ' || { echo "twistd does not list dache" >&2; exit 1; }
	touch $(STAMP)

run: install
	$(BIN)/twistd -n --pidfile= dache

# PostgreSQL server binaries are needed by the test suite's throwaway cluster.
postgres-bin:
	@sh scripts/ensure-postgres.sh

test: install postgres-bin
	$(BIN)/ruff check dache tests bench twisted
	$(BIN)/ruff format --check dache tests bench twisted
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint:
	$(BIN)/ruff check --fix dache tests bench twisted
	$(BIN)/ruff format dache tests bench twisted

# wrk and etcd come from Debian packages (installed when missing); PostgreSQL
# for the postgres engine's scenarios. QUICK=1: a smoke run under a minute.
bench: install postgres-bin
	@sh bench/ensure-tools.sh
	$(BIN)/python -m bench.run $(if $(QUICK),--quick,)
	$(BIN)/python -m bench.keyspace $(if $(QUICK),--quick,)
	$(BIN)/python -m bench.memory $(if $(QUICK),--quick,)
	$(BIN)/python -m bench.watch $(if $(QUICK),--quick,)
	$(BIN)/python -m bench.scale $(if $(QUICK),--quick,)

# The history checker under every nemesis (tests/faults/torture.py): MINUTES
# (default 10), SEED (default: the time), OUT (default: /tmp/dache-torture).
MINUTES ?= 10
torture: install postgres-bin
	$(BIN)/python -m tests.faults.torture --minutes $(MINUTES) $(if $(SEED),--seed $(SEED),) $(if $(OUT),--out $(OUT),)

# The Dockerfile built and run with podman, deploy/dache.service + dache.socket under a booted
# systemd (podman, runc, mmdebstrap installed when missing; images cached in podman's storage),
# and the static checks of both. README "Deploying" / "Verified".
DEPLOY_TESTS := tests/test_deploy_image.py tests/test_deploy_systemd_boot.py \
	tests/test_deploy_docker.py tests/test_deploy_systemd.py
deploy-check: install postgres-bin
	$(BIN)/python -m pytest $(DEPLOY_TESTS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info dache-data

# py-spy profiles of GET hit, SET memory and DELETE at 1, 16, 64 and 256 connections, each
# beside the bare twisted.web resource under the same load (bench/profile.py, bench/hot-path.md).
# SECONDS per run (default 6); OUT: keep the folded stacks in that directory.
SECONDS ?= 6
profile: install
	@sh bench/ensure-tools.sh
	$(BIN)/python -m bench.profile --with-ceiling --kind "GET hit,SET memory,DELETE" \
		--connections 1,16,64,256 --seconds $(SECONDS) --top 20 $(if $(OUT),--folded $(OUT),)
