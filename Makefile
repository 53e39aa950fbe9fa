# The two set-up commands of the README:
#   make demo   set everything up and run the embedded default end to end (Fashion-MNIST)
#   make test   set everything up and run the tests
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/fashion_mnist_rdm.py
WORKDIR ?= runs/fashion_mnist
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
RARM_CONFIG := configs/fashion_mnist_rarm.py
RARM_WORKDIR ?= runs/fmnist_rarm
OPENCLIPART := /usr/share/openclipart/png
DNNL_HEADER := /usr/include/oneapi/dnnl/dnnl.hpp
ONEDNN_SO := rdm_jax/ops/_onednn_conv.so
# tcmalloc for every job and test: with glibc's malloc, XLA:CPU maps a fresh temporary buffer for
# each step and the kernel zeroes its pages on first touch; tcmalloc keeps freed memory for reuse
# (benchmarks/RESULTS.md has what it saves).
TCMALLOC := /usr/lib/$(shell uname -m)-linux-gnu/libtcmalloc_minimal.so.4
RUN := LD_PRELOAD=$(TCMALLOC) $(PY)

.PHONY: demo rarm-demo figures test setup setup-test data onednn clean

$(VENV)/.installed: requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps efficientnet-lite-pytorch==0.1.0 torchvision==0.28.0 pytorch-fid==0.3.0 torch-fidelity==0.4.0 clean-fid==0.1.35 \
		taming-transformers-rom1504==0.0.6 clip-anytorch==2.6.0
	touch $@

# oneDNN convolutions for XLA:CPU (rdm_jax/ops/onednn.py; config.model.conv): Debian's libdnnl-dev
$(DNNL_HEADER):
	(apt-get install -y -q libdnnl-dev g++ || (apt-get update -q && apt-get install -y -q libdnnl-dev g++)) > /dev/null

$(ONEDNN_SO): rdm_jax/ops/onednn_conv.cc $(DNNL_HEADER) $(VENV)/.installed
	g++ -O2 -std=c++17 -fopenmp -shared -fPIC -isystem "$$($(PY) -c 'import jax.ffi; print(jax.ffi.include_dir())')" \
		-o $@.tmp $< -ldnnl && mv $@.tmp $@

onednn: $(ONEDNN_SO)

$(TCMALLOC):
	(apt-get install -y -q libtcmalloc-minimal4 || (apt-get update -q && apt-get install -y -q libtcmalloc-minimal4)) > /dev/null

setup: $(VENV)/.installed $(ONEDNN_SO) $(TCMALLOC)
setup-test: $(VENV)/.installed-test $(ONEDNN_SO) $(TCMALLOC)

$(FMNIST):
	(apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) > /dev/null

data: $(FMNIST)

demo: setup data
	$(RUN) -m rdm_jax.jobs.encode --config=$(CONFIG)
	$(RUN) -m rdm_jax.jobs.embed --config=$(CONFIG)
	$(RUN) -m rdm_jax.jobs.index --config=$(CONFIG)
	$(RUN) -m rdm_jax.jobs.neighbors --config=$(CONFIG)
	$(RUN) -m rdm_jax.train --config=$(CONFIG) --workdir=$(WORKDIR)
	$(RUN) -m rdm_jax.sample --config=$(CONFIG) --workdir=$(WORKDIR)
	$(RUN) -m rdm_jax.sample --config=$(CONFIG) --workdir=$(WORKDIR) --config.sample.condition=proposal
	$(RUN) -m rdm_jax.jobs.context_ablation --config=$(CONFIG) --workdir=$(WORKDIR)
	@echo "demo outputs: $(WORKDIR)/samples (PNG grids), $(WORKDIR)/context_ablation.json, $(WORKDIR)/eval/metrics.md and metrics.png, TensorBoard logs in $(WORKDIR)"
	$(RUN) -m rdm_jax.evaluate --config=$(CONFIG) --workdir=$(WORKDIR)

# The RARM demo (configs/fashion_mnist_rarm.py's commands): tokens, the RDM demo's neighbours at
# 64 px, 1500 training steps, its context ablation and samples
rarm-demo: setup data
	$(RUN) -m rdm_jax.jobs.encode --config=$(RARM_CONFIG)
	$(RUN) -m rdm_jax.jobs.embed --config=$(RARM_CONFIG)
	$(RUN) -m rdm_jax.jobs.index --config=$(RARM_CONFIG)
	$(RUN) -m rdm_jax.jobs.neighbors --config=$(RARM_CONFIG)
	$(RUN) -m rdm_jax.train --config=$(RARM_CONFIG) --workdir=$(RARM_WORKDIR)
	$(RUN) -m rdm_jax.jobs.context_ablation --config=$(RARM_CONFIG) --workdir=$(RARM_WORKDIR)
	$(RUN) -m rdm_jax.sample --config=$(RARM_CONFIG) --workdir=$(RARM_WORKDIR)

$(OPENCLIPART):
	(apt-get install -y -q openclipart-png || (apt-get update -q && apt-get install -y -q openclipart-png)) > /dev/null

# Every picture and demo table in the docs, from both demos' runs (benchmarks/figures.py)
figures: demo rarm-demo $(OPENCLIPART)
	$(RUN) benchmarks/figures.py --workdir=$(WORKDIR) --rarm_workdir=$(RARM_WORKDIR) --openclipart=$(OPENCLIPART)

test: setup-test data
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(RUN) -m pytest -q -n 2 --dist loadfile --durations=15

clean:
	rm -rf data runs
