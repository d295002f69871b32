# specrec: the two commands a newcomer needs are `make run` and `make test`.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
TORCH   := torch==2.13.0

.PHONY: install proto proto-check proto-release test run lint bench bench-quick clean helm-bin images docker-deps

install: $(STAMP)

# torch first, pinned: a looser pin would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

proto: install
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. \
		$$(find protos -name '*.proto')

test: install proto-check docker-deps
	.venv/bin/ruff check .
	$(PY) -m pytest -q --durations=12 tests

# Container images specrec/{base,orchestrator,draft,target}:0.1.0 with the tiny profile baked in (train it first:
# `make run`, or `.venv/bin/python -m harness.demo --train-only`). Builds with the docker daemon that answers, else a
# private dockerd (root); `--help` for the base image and the artifacts: .venv/bin/python -m harness.containers --help
images: install docker-deps
	$(PY) -m harness.containers

# dockerd and debootstrap from Debian's packages (tests/test_images.py builds and runs the images).
docker-deps:
	@command -v dockerd >/dev/null && command -v debootstrap >/dev/null || { \
	  echo "installing docker.io and debootstrap (apt-get)"; apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io debootstrap \
	    ca-certificates >/dev/null; }

# The contract's hygiene: buf lint, and no breaking change against the last released API (protos/released.binpb).
# buf comes from npm (scripts/fetch_buf.sh, pinned). After a release: `make proto-release` records the new baseline.
proto-check:
	BUF=$$(scripts/fetch_buf.sh) && $$BUF lint && $$BUF breaking --against protos/released.binpb

proto-release:
	BUF=$$(scripts/fetch_buf.sh) && $$BUF lint && $$BUF build -o protos/released.binpb

lint: install
	.venv/bin/ruff check .
	.venv/bin/mypy specrec

run: install
	$(PY) -m harness.demo

# The benchmark suite (bench/run.py): stack vs plain, HF assisted generation, perf_analyzer, plots, one report in
# bench/results/bench-<date>.md. Full = bench profile (27M target: ~80 min to train on first use, then ~30 min); quick = tiny, < 5 min.
bench: install
	PY=$(PY) bench/fetch_perf_analyzer.sh >/dev/null
	@t0=$$(date +%s); $(PY) bench/run.py; rc=$$?; echo "make bench took $$(( $$(date +%s) - t0 )) s"; exit $$rc

bench-quick: install
	PY=$(PY) bench/fetch_perf_analyzer.sh >/dev/null
	@t0=$$(date +%s); $(PY) bench/run.py --quick; rc=$$?; echo "make bench-quick took $$(( $$(date +%s) - t0 )) s"; exit $$rc

clean:
	rm -rf .venv .pytest_cache .ruff_cache .mypy_cache

helm-check: install
	scripts/fetch_helm.sh >/dev/null
	$(PY) -m pytest -q tests/test_helm.py
