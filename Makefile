# Quick start targets (README). Everything runs inside a local virtual environment.
VENV ?= .venv
PY := $(VENV)/bin/python
# On the project's CPU machines this resolves to a local CPU build; a plain `torch` would pull
# several GB of CUDA packages.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test bench clean

$(PY):
	python3 -m venv $(VENV)

install: $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q ".[dev]"

demo: install
	$(VENV)/bin/mmfast demo

test: $(PY)
	@$(PY) -c "import mmfast" 2>/dev/null || $(MAKE) install
	cd tests && ../$(PY) -m pytest -q -p no:cacheprovider .

bench: $(PY)
	$(PY) -m pytest benchmarks -q --benchmark-json=benchmarks/results/$$($(PY) -c "import torch;print(torch.cuda.get_device_name().replace(' ','_') if torch.cuda.is_available() else 'cpu')").json

clean:
	rm -rf $(VENV) build *.egg-info
