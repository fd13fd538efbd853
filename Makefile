# `make demo` and `make test` work on a fresh machine: they create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-fast install clean-demo tensorboard padding-bench reference-quant-bench refdpo-sweep multiref-study bandit multiref-bench onpolicy-study generation-bench sams-bench sams-study

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: on this CPU machine 2.13.0 is the local CPU wheel (a range would pull CUDA builds).
	$(PIP) install torch==2.13.0
	# DeepSpeed builds against the installed torch (no build isolation, no CUDA ops compiled).
	DS_BUILD_OPS=0 $(PIP) install --no-build-isolation deepspeed==0.19.8
	$(PIP) install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Quickstart: synthetic assets -> SFT -> DPO (reference = SFT policy) -> greedy-generation evaluation.
demo: $(STAMP)
	$(PY) -m datamodules.synthetic build --out runs/demo/assets
	$(PY) -m lightning_modules fit --config configs/quickstart/sft.yaml
	$(PY) -m lightning_modules fit --config configs/quickstart/dpo.yaml
	$(PY) -m lightning_modules.studies.evaluate --config configs/quickstart/evaluate.yaml

# Studies: one launch style, `python -m lightning_modules.studies.<name> --config <yaml> [--key=value ...]`;
# each writes runs/<target>/summary.json, summary.md and a PNG (configs under configs/studies/<target>/).

# β × reference choice on the synthetic task (resumes: delete runs/refdpo-sweep to start over).
refdpo-sweep: $(STAMP)
	$(PY) -m lightning_modules.studies.refdpo_sweep --config configs/studies/refdpo-sweep/sweep.yaml

# Multi-reference DPO on the synthetic task: DPO against each of 3 references vs MRPO / MDPO × 7 weighting strategies,
# 3 seeds (resumes: delete runs/multiref-study to start over).
multiref-study: $(STAMP)
	$(PY) -m lightning_modules.studies.multiref_study --config configs/studies/multiref-study/study.yaml

# The on-policy study's bandit: 2 rewards × 6 algorithms × offline / on-policy × 3 seeds (CPU, ~3 min; resumes: delete runs/bandit).
bandit: $(STAMP)
	$(PY) -m lightning_modules.studies.bandit_study --config configs/studies/bandit/study.yaml

# On-policy vs offline preference learning on the synthetic task: 5 methods × aligned / unaligned reward × 3 seeds (CPU, ~15 min; resumes: delete runs/onpolicy-study).
onpolicy-study: $(STAMP)
	$(PY) -m lightning_modules.studies.onpolicy_study --config configs/studies/onpolicy-study/study.yaml

# Step cost of K = 3 cached references (MRPO / MDPO) against DPO with one, on the demo model (CPU, ~2 min).
multiref-bench: $(STAMP)
	$(PY) -m lightning_modules.studies.multiref_benchmark --config configs/studies/multiref-bench/bench.yaml

# On-policy sampling throughput and an on-policy step's generation / training split, on the demo model (CPU, ~1 min).
generation-bench: $(STAMP)
	$(PY) -m lightning_modules.studies.generation_benchmark --config configs/studies/generation-bench/bench.yaml

# Step cost of DPO + SamS (ratio 0.5 and 1.0) against plain DPO, and the scheduler's parameter count, on the demo model (CPU, ~10 min).
sams-bench: $(STAMP)
	$(PY) -m lightning_modules.studies.sams_benchmark --config configs/studies/sams-bench/bench.yaml

# SamS vs DPO and DPO + random-50% on the synthetic task: 5 methods × 0% / 20% flipped labels × 3 seeds (CPU, ~15 min; resumes: delete runs/sams-study).
sams-study: $(STAMP)
	$(PY) -m lightning_modules.studies.sams_study --config configs/studies/sams-study/study.yaml

# Padding with random vs length-grouped batches on synthetic UltraFeedback-like lengths (CPU, seconds).
padding-bench: $(STAMP)
	$(PY) -m lightning_modules.studies.padding_benchmark --config configs/studies/padding-bench/padding.yaml

# Reference model float32 vs 8-bit vs 4-bit (nf4) via bitsandbytes: memory, speed, log-prob drift (CPU, ~1 min).
reference-quant-bench: $(STAMP)
	$(PY) -m lightning_modules.studies.quantization_benchmark --config configs/studies/reference-quant-bench/quantization.yaml

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir runs

clean-demo:
	rm -rf runs/demo
