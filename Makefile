# Quick start targets (README). Everything runs inside a local virtual environment.
VENV ?= .venv
PY := $(VENV)/bin/python
# On the project's CPU machines this resolves to a local CPU build; a plain `torch` would pull
# several GB of CUDA packages.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test bench bench-targets clean

$(PY):
	python3 -m venv $(VENV)

# A regular (non-editable) install, so the tests exercise what a user gets; re-run on every
# `make test` so edits to the sources are never tested stale.
install: $(PY)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q ".[dev]"

demo: install
	$(VENV)/bin/mmfast demo

# The tests, then every benchmark case once (--benchmark-disable: nothing is timed) so the
# suite cannot rot on machines without a GPU. Run from inside each folder so the installed
# mmfast, not the source tree, is imported.
test: install
	cd tests && ../$(PY) -m pytest -q -p no:cacheprovider .
	cd benchmarks && ../$(PY) -m pytest -q -p no:cacheprovider --benchmark-disable .

# Times every case, writes benchmarks/results/<device>.json and renders it (into the README's
# benchmarks section when the device is a GPU; printed on CPU).
bench: $(PY)
	@dev=$$($(PY) -c "import torch;print(torch.cuda.get_device_name().replace(' ','_') if torch.cuda.is_available() else 'cpu')") && \
	$(PY) -m pytest benchmarks -q --benchmark-json=benchmarks/results/$$dev.json && \
	if [ "$$dev" = cpu ]; then $(PY) benchmarks/report.py benchmarks/results/cpu.json; \
	else $(PY) benchmarks/report.py benchmarks/results/$$dev.json --readme README.md; fi

# Only the cases the issues' targets are judged on (a short GPU session), rendered and printed.
bench-targets: $(PY)
	@dev=$$($(PY) -c "import torch;print(torch.cuda.get_device_name().replace(' ','_') if torch.cuda.is_available() else 'cpu')") && \
	$(PY) -m pytest benchmarks -q --targets-only --benchmark-json=benchmarks/results/$$dev-targets.json && \
	$(PY) benchmarks/report.py benchmarks/results/$$dev-targets.json

clean:
	rm -rf $(VENV) build *.egg-info
