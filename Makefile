# Two commands: `make run` (default pipeline) and `make test` (test suite). Everything else is a helper.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# Prefect's schema, migrated once per install: a fresh PREFECT_HOME starts from a copy (src/mmkd/tracking/prefect_db.py)
PREFECT_DB := $(VENV)/share/mmkd/prefect.db
# torch comes from this machine's disk through pip (uv does not look there; the installed torch then satisfies the
# project's range); the rest resolves with uv, in seconds where pip backtracks for minutes over the S3 packages.
# pip prints one warning per missing local index folder on this kind of machine; keep the log readable
PIP    := $(BIN)/pip install --disable-pip-version-check -q
QUIET  := 2>&1 | grep -v "^WARNING: Location" || true

.PHONY: install run test smoke dvc-repro mlflow-ui mlflow-team prefect-server deploy worker clean

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --no-compile torch==2.14.1 torchvision==0.29.1 $(QUIET)
	$(PIP) "uv>=0.5" $(QUIET)
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -e ".[dev,dicom-codecs]"
	# bytecode for what pip installed above (torch, sympy, numpy, ...): without it every process that imports torch
	# compiles ~5000 files again (~1.5 s), where PYTHONDONTWRITEBYTECODE is set (as on this team's machines). Only a
	# speed-up: files written for newer Pythons (whenever's _typing_312.py) fail to compile and are left as they are
	$(BIN)/python -m compileall -q -j 0 $$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") > /dev/null 2>&1 || true
	$(BIN)/python -c "import mmkd, torch, open_clip, prefect, mlflow, dvc, great_expectations"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

$(PREFECT_DB): $(STAMP)
	$(BIN)/python -m mmkd.tracking.prefect_db $@ > /dev/null

install: $(STAMP) $(PREFECT_DB)

# The default pipeline on the embedded corpus: data -> ... -> registered student; then record the
# outputs in dvc.lock (`dvc commit`) so that `dvc repro` right after reports everything up to date.
run: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/mmkd data synth --if-missing
	$(BIN)/dvc add -q data
	PATH=$(CURDIR)/$(BIN):$$PATH PREFECT_HOME=$${PREFECT_HOME:-$(CURDIR)/.prefect} $(BIN)/mmkd run --profile default
	$(BIN)/dvc commit -f -q
	@echo "dvc.lock updated; 'dvc repro' now reports the pipeline up to date."

test: install
	bash tests/system_deps.sh
	bash tests/fetch_samples.sh
	PATH=$(CURDIR)/$(BIN):$$PATH bash tests/run.sh

smoke: install
	PATH=$(CURDIR)/$(BIN):$$PATH PREFECT_HOME=$${PREFECT_HOME:-$(CURDIR)/.prefect} $(BIN)/mmkd run --profile smoke --root $${ROOT:-/tmp/mmkd-smoke} --params $(CURDIR)/params.yaml

dvc-repro: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

mlflow-ui: install
	PATH=$(CURDIR)/$(BIN):$$PATH bash mlflow_server/start.sh

# A local team stack (PostgreSQL + SeaweedFS S3 + MLflow; mlflow_server/README.md); AUTH=1 adds basic-auth
mlflow-team: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/mmkd mlflow-server --team $(if $(AUTH),--auth)

# Scheduled and data-triggered retraining: a Prefect server (127.0.0.1:4200), the deployments, a worker.
prefect-server: install
	PREFECT_HOME=$${PREFECT_HOME:-$(CURDIR)/.prefect} $(BIN)/prefect server start --host 127.0.0.1 --port 4200

deploy: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/mmkd deploy --apply

worker: install
	PATH=$(CURDIR)/$(BIN):$$PATH PREFECT_HOME=$${PREFECT_HOME:-$(CURDIR)/.prefect} $(BIN)/mmkd worker

clean:
	rm -rf artifacts reports/data_docs .prefect
