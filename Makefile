# The handful of commands a person types. Each target creates what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The reference lives outside the checkout so that it is cached between runs.
REFVENV ?= $(HOME)/.cache/keas.kmi/reference-3.3.0
ZODB64 ?= .venv-zodb64
HOST   ?= 127.0.0.1
PORT   ?= 8080
CERTS  ?= certs
# REFERENCE=0: no network for the reference, deselect the differential tests.
REFERENCE ?= 1
ifeq ($(REFERENCE),0)
REF_DEP :=
MARKERS := -m 'not reference'
else
REF_DEP := $(REFVENV)/.done
MARKERS :=
endif

SOURCES := Cargo.toml pyproject.toml $(wildcard src/*.rs)

.PHONY: test test-rust test-fuzz-build test-python serve certs bench lint fuzz clean

## make test: build everything and run the whole suite (fmt, clippy, cargo test, pytest, conformance, differential)
test: lint test-rust test-fuzz-build test-python

test-rust:
	cargo test --release --quiet

test-python: $(VENV)/.built $(REF_DEP) $(ZODB64)/.built
	KMI_REFERENCE_PYTHON=$(REFVENV)/bin/python $(PY) -m pytest $(MARKERS) $(PYTEST_ARGS)
	$(ZODB64)/bin/python -m pytest tests/test_zodb64.py $(PYTEST_ARGS)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip

$(VENV)/.built: $(VENV)/bin/python $(SOURCES)
	$(VENV)/bin/pip install --quiet -e '.[test,server]'
	touch $@

# keas.kmi 3.3.0 with pycryptodome: the reference the differential tests and benchmarks run against.
$(REFVENV)/.done:
	rm -rf $(REFVENV)
	$(PYTHON) -m venv $(REFVENV)
	$(REFVENV)/bin/pip install --quiet 'keas.kmi==3.3.0' 'ZODB==6.3' zope.component
	touch $@

# ZODB 6.4 wraps __setstate__ errors in StateLoadError; a second environment covers it.
$(ZODB64)/.built: $(VENV)/.built
	test -x $(ZODB64)/bin/python || $(PYTHON) -m venv $(ZODB64)
	$(ZODB64)/bin/pip install --quiet -e . pytest hypothesis 'ZODB==6.4' zope.testing
	touch $@

## make certs: a self-signed certificate and key for localhost (never committed)
# The key is PKCS#8 (BEGIN PRIVATE KEY), the only form granian reads.
certs: $(CERTS)/sample.crt

$(CERTS)/sample.crt:
	mkdir -p $(CERTS)
	(umask 077 && openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 \
	  -out $(CERTS)/sample.key 2>/dev/null)
	openssl req -x509 -key $(CERTS)/sample.key -days 365 -subj /CN=localhost \
	  -addext 'subjectAltName=DNS:localhost,IP:127.0.0.1' -out $(CERTS)/sample.crt
	cp $(CERTS)/sample.crt sample.crt

## make serve: the key server on https://localhost:8080, in the foreground (Ctrl-C stops it)
# granian serves it; address, TLS files, workers and the key directory come from $(SERVER_INI);
# HOST=... or PORT=... on the command line override its address.
SERVER_INI ?= server.ini
SERVE_ARGS = $(if $(filter-out file default,$(origin HOST)),--host $(HOST)) \
             $(if $(filter-out file default,$(origin PORT)),--port $(PORT))

serve: $(VENV)/.built certs
	$(PY) -m keas.kmi.wsgi $(strip $(SERVER_INI) $(SERVE_ARGS))

lint:
	cargo fmt --check
	cargo clippy --all-targets --features python -- -D warnings

clean:
	rm -rf $(VENV) $(ZODB64) python/keas/kmi/*.so

## make bench: ours against keas.kmi 3.3.0, alternating, with targets (BENCH_QUICK=1: a smoke run)
# Writes benchmarks/results/<date>-<short sha>.txt; scratch files go to benchmarks/work/.
bench: $(VENV)/.built $(REFVENV)/.done
	test -x $(REFVENV)/bin/gunicorn || $(REFVENV)/bin/pip install --quiet gunicorn
	VENV=$(VENV) REFVENV=$(REFVENV) BENCH_QUICK=$(BENCH_QUICK) $(PY) benchmarks/bench.py

## make fuzz: every cargo-fuzz target for FUZZ_SECONDS each (not part of the test command)
FUZZ_SECONDS ?= 60
fuzz:
	fuzz/run.sh $(FUZZ_SECONDS)

# Part of make test, so that the fuzz targets cannot rot unseen: the seeds are
# made (into a temporary directory) and the fuzz crate is type-checked on the
# stable toolchain, without cargo-fuzz.
test-fuzz-build:
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && $(PYTHON) fuzz/make_seeds.py "$$tmp"
	cargo check --quiet --manifest-path fuzz/Cargo.toml --bins
