# Two entry points: `make run` (the main job) and `make test`. Both bootstrap .venv first;
# a stamp file makes a second bootstrap a no-op until pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUNS ?= runs
P1_EPOCHS ?= 20
P2_EPOCHS ?= 60
EPOCHS ?= 80
PRESET ?= paper
MODELS ?= models

PORT ?= 8000

.PHONY: venv run pipeline train export latency serve test system-deps lint bench clean \
	demo-screenshot proto mlserver

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# CPU build of torch, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[train,dev]'
	touch $(STAMP)

# Main job: SmartMixed and a fixed-ReLU baseline on the embedded MNIST subset, a comparison,
# both exported to a verified ONNX model repository, a short latency table, then serving them
# (foreground, Ctrl-C to stop). `make pipeline` does everything but serve.
run: pipeline serve

pipeline: train export latency

train: $(STAMP)
	$(BIN)/smartmixed-train --data mnist --preset $(PRESET) --mode smartmixed \
		--p1-epochs $(P1_EPOCHS) --p2-epochs $(P2_EPOCHS) --out $(RUNS)/mnist-smartmixed --overwrite
	$(BIN)/smartmixed-train --data mnist --preset $(PRESET) --mode fixed:relu \
		--epochs $(EPOCHS) --out $(RUNS)/mnist-relu --overwrite
	$(BIN)/smartmixed-train --compare $(RUNS)/mnist-smartmixed $(RUNS)/mnist-relu

export: $(STAMP)
	$(BIN)/smartmixed-export $(RUNS)/mnist-smartmixed --repository $(MODELS) --overwrite
	$(BIN)/smartmixed-export $(RUNS)/mnist-relu --repository $(MODELS) --overwrite
	$(BIN)/smartmixed-export $(RUNS)/mnist-smartmixed --repository $(MODELS) --quantize int8 --overwrite

latency: $(STAMP)
	$(BIN)/smartmixed-bench latency --run $(RUNS)/mnist-smartmixed --out bench-out \
		--rounds 8 --repeats 20 --threads 1 --quiet

serve: $(STAMP)
	@echo "serving $(MODELS)/ on http://127.0.0.1:$(PORT) (Ctrl-C to stop). Open http://127.0.0.1:$(PORT)/"
	@echo "in a browser (model cards, draw a digit), or try, from another shell:"
	@echo "  curl -s -X POST localhost:$(PORT)/v1/models/mnist-smartmixed:predict -H 'Content-Type: application/json' -d @examples/predict-digit.json"
	@echo "  curl -s -X POST localhost:$(PORT)/v2/models/mnist-smartmixed/infer -H 'Content-Type: application/json' -d @examples/infer-digit.json"
	@echo "  curl -s localhost:$(PORT)/v2/models/mnist-smartmixed"
	$(BIN)/smartmixed-serve --repository $(MODELS) --port $(PORT)

# The quick path (under 2 minutes on 2 cores): ruff, then every test not marked slow, one test
# file per worker on every core (a file's fixtures are built once). .ci/run also runs the slow
# ones (pytest -m slow).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow" -n auto --dist loadfile

# Debian tools some tests and benches use: docker-compose (validates docker-compose.yml), nginx
# (nginx -t and a load-balancing test), wrk and nghttp2-client's h2load (the HTTP bench's REST
# and gRPC load generators), chromium and
# chromium-driver (the page's browser tests and `make demo-screenshot`); and Debian data:
# dataset-fashion-mnist (the full Fashion-MNIST that `--data fashion-mnist` reads without
# --data-dir). Tests that need one skip, saying which, when it is missing; .ci/run installs them
# first.
# package, or package=command where the command it installs has another name
SYSTEM_TOOLS := docker-compose nginx wrk nghttp2-client=h2load chromium chromium-driver=chromedriver
# package=folder it installs
SYSTEM_DATA := dataset-fashion-mnist=/usr/share/datasets/fashion-mnist
system-deps:
	@missing=""; for entry in $(SYSTEM_TOOLS); do \
		PATH="$$PATH:/usr/sbin" command -v $${entry#*=} >/dev/null || missing="$$missing $${entry%%=*}"; done; \
	for entry in $(SYSTEM_DATA); do \
		[ -d "$${entry#*=}" ] || missing="$$missing $${entry%%=*}"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# docs/demo.png: the page (GET /) in headless chromium (make system-deps), serving $(MODELS)/
# (`make pipeline` writes it; without it, the browser tests' tiny models), a digit drawn.
demo-screenshot: $(STAMP)
	SMARTMIXED_DEMO_SCREENSHOT=docs/demo.png SMARTMIXED_DEMO_REPOSITORY=$(MODELS) \
		$(BIN)/python -m pytest -q -p no:cacheprovider tests/serve/test_page.py -k demo_screenshot -rs

# serve/grpc_service.proto -> serve/grpc_service_pb2.py and serve/grpc_service_pb2_grpc.py
# (committed; tests/serve/test_grpc.py checks that this target writes the same bytes). Needs the
# dev extra's grpcio-tools (`make venv`). The proto is compiled as smartmixed/serve/... so that the
# service module imports the message module from the package; the message module's descriptors
# go to a pool of their own instead of protobuf's default one, where tritonclient.grpc, MLServer
# and KServe register the same names (package inference) and a second registration fails.
PROTO_OUT ?= serve
proto:
	rm -rf $(PROTO_OUT)/.protoc && mkdir -p $(PROTO_OUT)/.protoc
	$(BIN)/python -m grpc_tools.protoc -Ismartmixed/serve=serve --python_out=$(PROTO_OUT)/.protoc \
		--grpc_python_out=$(PROTO_OUT)/.protoc smartmixed/serve/grpc_service.proto
	sed -i 's/_descriptor_pool\.Default()\.AddSerializedFile(/_descriptor_pool.DescriptorPool().AddSerializedFile(/' \
		$(PROTO_OUT)/.protoc/smartmixed/serve/grpc_service_pb2.py
	mv $(PROTO_OUT)/.protoc/smartmixed/serve/grpc_service_pb2.py \
		$(PROTO_OUT)/.protoc/smartmixed/serve/grpc_service_pb2_grpc.py $(PROTO_OUT)/
	rm -rf $(PROTO_OUT)/.protoc

# MLServer 1.7 in an environment of its own (it pins fastapi<0.116, which .venv cannot hold), for
# `smartmixed-bench http --against-mlserver`; pins in bench/mlserver-requirements.txt. A stamp
# makes a second run a no-op until that file changes.
MLSERVER_VENV := .venv-mlserver
mlserver: $(MLSERVER_VENV)/.installed

$(MLSERVER_VENV)/.installed: bench/mlserver-requirements.txt
	test -x $(MLSERVER_VENV)/bin/python || $(PYTHON) -m venv $(MLSERVER_VENV)
	$(MLSERVER_VENV)/bin/python -m pip install --quiet -r bench/mlserver-requirements.txt
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/smartmixed-bench train-cost --out bench-out

clean:
	rm -rf $(VENV) build *.egg-info
