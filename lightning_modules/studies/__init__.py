"""Studies and benchmarks: every `make` target that writes `runs/<target>/`. Nothing outside this package imports them.

Each study is a typed function `<module>.<module>` (its docstring documents every parameter), run
the one way `launch.run_study` implements:

    python -m lightning_modules.studies.<module> --config <yaml> [--key=value ...]

and reports the one way `report.write_report` implements: `summary.json`, `summary.md`, a PNG.
"""

# make target -> study module (its configs: configs/studies/<target>/, the demo's: configs/quickstart/evaluate.yaml)
STUDIES = {
    "demo": "evaluate",
    "refdpo-sweep": "refdpo_sweep",
    "multiref-study": "multiref_study",
    "multiref-bench": "multiref_benchmark",
    "padding-bench": "padding_benchmark",
    "reference-quant-bench": "quantization_benchmark",
    "bandit": "bandit_study",
    "onpolicy-study": "onpolicy_study",
    "generation-bench": "generation_benchmark",
    "sams-bench": "sams_benchmark",
    "sams-study": "sams_study",
}
