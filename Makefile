# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_SOURCE ?= $(if $(wildcard ../shared/data/README.md),../shared/data,)

.PHONY: install data run test smoke bench clean

$(BIN)/trainer: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the wheels on this project's machines come from local files
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/trainer

data: install
	$(BIN)/python scripts/get_data.py fashion_mnist --dest data $(if $(DATA_SOURCE),--source $(DATA_SOURCE),)

run: data
	$(BIN)/trainer fit configs/quickstart.yaml

# the habits that keep the code as it is: lint (pyflakes, import order, bugbear, pyupgrade), format, tests
# (two pytest-xdist workers, one thread each: the suite's subprocesses and waits overlap with compute)
PYTEST_ARGS ?= -n 2
test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# CIFAR-10 epoch: compute floor vs trainer vs raw PyTorch (vs fastai when installed); see README, Speed.
# BENCH_ARGS='--limit 5000 --only floor,trainer' for a quick look.
bench: install
	$(BIN)/python scripts/get_data.py cifar10 --dest data $(if $(DATA_SOURCE),--source $(DATA_SOURCE),)
	$(BIN)/python scripts/bench.py $(BENCH_ARGS)

smoke: data
	$(BIN)/trainer fit configs/quickstart.yaml --smoke

clean:
	rm -rf $(VENV) runs .pytest_cache
