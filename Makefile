# Entry points. `make demo` runs the local demo, `make test` runs every test; both set up
# what they need (Python venv, Kafka, etcd, kube-apiserver, helm, the local node and the
# image), cached outside the checkout. KRO_NODE=0 leaves the local node out.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV = $(shell ./hack/venv.sh)
PY = $(VENV)/bin/python
# Tests run on this many pytest-xdist workers: most of a test is waiting on servers, not CPU.
PYTEST_WORKERS ?= 3

.PHONY: help
help: ## list targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | \
	  awk -F ':.*## ' '{gsub(/\$$\$$/, "$$", $$2); printf "  %-14s %s\n", $$1, $$2}'

.PHONY: venv
venv: ## create or update the cached Python environment
	@./hack/venv.sh

.PHONY: up
up: ## start Kafka, etcd, kube-apiserver, kube-controller-manager and the local node (idempotent)
	$(PY) hack/localenv.py up

.PHONY: down
down: ## stop the local servers and the node; restore the host settings the node changed
	$(PY) hack/localenv.py down

.PHONY: image
image: ## build the image from the Dockerfile (buildah) and import it into the node's containerd
	$(PY) hack/localenv.py image

.PHONY: env
env: ## print shell exports for the local servers: eval "$$(make -s env)"
	@$(PY) hack/localenv.py env

.PHONY: test
test: ## set everything up and run the whole test suite
	@py=$(PY); $$py hack/localenv.py up && $$py -m pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

.PHONY: lint
# mypy: the packages, and the bench scripts typed so far (bench/peers.py and its measures).
lint: ## ruff and mypy --strict
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy && \
	  $(VENV)/bin/mypy bench/peers.py bench/peer_measures.py tests/test_bench_peers.py

# --------------------------------------------------------------------------- shipping
CHART = charts/kafka-retry-operator

.PHONY: chart-crds
chart-crds: ## copy the generated crds/*.yaml into the chart (run by `make crds`)
	@rm -f $(CHART)/crds/*.yaml && mkdir -p $(CHART)/crds && cp crds/*.yaml $(CHART)/crds/

.PHONY: kind
kind: ## with Docker: a kind cluster with Kafka, the image, the chart and an example pipeline
	./hack/kind-up.sh

.PHONY: crds
crds: ## regenerate crds/ from the pydantic models (workers/kafka_retry/model.py)
	$(PY) -m kafka_retry_operator.crd crds
	@$(MAKE) --no-print-directory chart-crds  # the chart ships copies (charts/.../crds)

# --------------------------------------------------------------------------- demo and docs
.PHONY: demo
demo: ## the local demo: operator, tier workers, an example service; a DLQ filled and replayed
	@$(PY) hack/demo.py $(DEMO_ARGS)

.PHONY: demo-down
demo-down: ## stop what a demo left running, then the local servers
	@$(PY) hack/demo.py down
	$(PY) hack/localenv.py down

.PHONY: docs
docs: ## regenerate docs/api.md (the RetryPipeline and DLQReplay reference) from the models
	$(PY) hack/apidocs.py docs/api.md

# --------------------------------------------------------------------------- benchmarks
# Ratios measured side by side in one run, never pass/fail; JSON in bench/results/ (git-ignored).
# Pass options with BENCH_ARGS, e.g. `make bench-operator BENCH_ARGS="--sizes 50"`.
# The servers of this checkout's environment (KRO_* ports), not the default ones.
BENCH = @py=$(PY); $$py hack/localenv.py up >/dev/null && eval "$$($$py hack/localenv.py env)" && $$py

.PHONY: bench-isolation
bench-isolation: ## benchmark: live-lane throughput and latency with failures vs in-place retries
	$(BENCH) bench/isolation.py $(BENCH_ARGS)

.PHONY: bench-tier
bench-tier: ## benchmark: tier worker rate vs a bare confluent-kafka loop
	$(BENCH) bench/tier_throughput.py $(BENCH_ARGS)

.PHONY: bench-delay
bench-delay: ## benchmark: lateness of tier events against their due time, under load
	$(BENCH) bench/delay_precision.py $(BENCH_ARGS)

.PHONY: bench-tier-stream
bench-tier-stream: ## benchmark: a tier under a steady stream vs the same events as a due backlog
	$(BENCH) bench/tier_stream.py $(BENCH_ARGS)

.PHONY: bench-eos
bench-eos: ## benchmark: a tier's forward rate and p99 lateness, ExactlyOnce vs AtLeastOnce
	$(BENCH) bench/exactly_once.py $(BENCH_ARGS)

.PHONY: bench-http
bench-http: ## benchmark: the managed live lane (http, maxInFlight 1/8/32) vs the SDK, 20 ms a call
	$(BENCH) bench/http_lane.py $(BENCH_ARGS)

.PHONY: bench-operator
bench-operator: ## benchmark: 50/200/500 pipelines under one operator: Ready, refresh, memory
	$(BENCH) bench/operator_scale.py $(BENCH_ARGS)

# The Spring Kafka peer: built once with Maven (its repository in the shared cache, the build in
# bench/peers/target, git-ignored), again only when its sources change; offline first.
M2 = $(or $(KRO_CACHE),$(HOME)/.cache/kafka-retry-operator)/m2
PEER_JAR = bench/peers/target/spring-peer.jar
MVN = mvn -B -q -Dmaven.repo.local=$(M2) -f bench/peers/pom.xml package

$(PEER_JAR): bench/peers/pom.xml $(shell find bench/peers/src -type f)
	$(MVN) -o || $(MVN)

.PHONY: bench-peers
bench-peers: $(PEER_JAR) ## benchmark: ours vs Spring Kafka @RetryableTopic, same broker and events
	$(BENCH) bench/peers.py --jar $(PEER_JAR) $(BENCH_ARGS)

.PHONY: bench
bench: bench-isolation bench-tier bench-tier-stream bench-delay bench-http bench-operator ## all six benchmarks (about 7 min; bench-peers apart)
