"""The studies package: the one report (`report.py`), the one launch style (`launch.py`), every study on it."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_modules.studies import STUDIES
from lightning_modules.studies.launch import one_paragraph, run_study, study_parser
from lightning_modules.studies.report import format_value, markdown_table, new_figure, write_report

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("value", "fmt", "text"), [
    (0.52345, None, "0.523"), (1.0, None, "1.000"), (12345.678, None, "12345.678"), (0.0, None, "0.000"),
    (4.2e-05, None, "4.20e-05"), (-3e7, None, "-3.00e+07"), (float("nan"), None, "nan"), (7, None, "7"),
    (True, None, "True"), ("-", None, "-"), (None, None, "-"), (None, ".1%", "-"),
    (0.4061, ".1%", "40.6%"), (15.46, "{:.1f}×", "15.5×"), (3, lambda v: f"<{v}>", "<3>"),
])  # fmt: skip
def test_format_value(value, fmt, text) -> None:
    assert format_value(value, fmt) == text


def test_markdown_table_exact() -> None:
    rows = [{"policy": "sft", "reward": 0.52345, "acc": None, "n": 3},
            {"policy": "dpo", "reward": 1.0, "acc": 0.8, "n": 4}]
    assert markdown_table(rows) == "\n".join([
        "| policy | reward | acc | n |",
        "|---|---|---|---|",
        "| sft | 0.523 | - | 3 |",
        "| dpo | 1.000 | 0.800 | 4 |",
    ])
    # a subset of columns, renamed and reordered, one with its own format; a missing key shows as "-"
    renamed = markdown_table(rows, {"reward": "mean reward", "policy": "who", "extra": "x"}, {"reward": ".1%"})
    assert renamed == "\n".join([
        "| mean reward | who | x |",
        "|---|---|---|",
        "| 52.3% | sft | - |",
        "| 100.0% | dpo | - |",
    ])
    assert markdown_table(rows, ["n", "policy"]).splitlines()[2] == "| 3 | sft |"
    with pytest.raises(ValueError, match="at least one row"):
        markdown_table([])


def test_new_figure_gives_a_flat_list_of_panels() -> None:
    import matplotlib

    fig, axes = new_figure(3, 2, panel_size=(2, 1), title="t")
    assert matplotlib.get_backend().lower() == "agg"
    assert len(axes) == 6 and list(fig.get_size_inches()) == [6, 2] and fig._suptitle.get_text() == "t"
    _, (single,) = new_figure()
    assert single.figure is not fig


def test_write_report_writes_three_files_atomically_and_prints_the_table(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "study"
    out.mkdir()
    (out / "summary.json").write_text("old")  # replaced, never appended to or half-written
    replaced: list[tuple[Path, Path]] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace",
                        lambda src, dst: (replaced.append((Path(src), Path(dst))), real_replace(src, dst)))
    summary = {"n": 3, "rows": [{"a": 0.5, "b": None}], "nested": {"x": [1, 2.5, "s"]}, "flag": True}
    rows = [{"name": "x", "value": 0.25}, {"name": "y", "value": 2e-5}]
    fig, (ax,) = new_figure()
    ax.plot([0, 1], [0, 1])

    paths = write_report(out, summary, rows, fig, title="My study", intro="How.\n", figure_name="plot.png",
                         formats={"value": ".2f"}, also_wrote=[out / "extra.jsonl"])

    assert (paths.json, paths.markdown, paths.figure) == (out / "summary.json", out / "summary.md", out / "plot.png")
    assert json.loads(paths.json.read_text()) == summary  # JSON round trip
    table = "| name | value |\n|---|---|\n| x | 0.25 |\n| y | 0.00 |"
    assert paths.markdown.read_text() == f"# My study\n\nHow.\n\n{table}\n"
    assert paths.figure.read_bytes()[:8] == PNG
    # every file was written next to its target, then moved into place in one step
    assert sorted(dst.name for _, dst in replaced) == ["plot.png", "summary.json", "summary.md"]
    assert all(src.parent == dst.parent == out and src.name.startswith(f".{dst.name}.") for src, dst in replaced)
    assert sorted(p.name for p in out.iterdir()) == ["plot.png", "summary.json", "summary.md"]  # no temp files left
    printed = capsys.readouterr().out
    assert printed.startswith(table + "\n") and f"{out / 'extra.jsonl'}" in printed.splitlines()[-1]


def toy_study(out_dir: str, epochs: int = 3, names: tuple[str, ...] = ()) -> dict:
    """A study for the launcher tests.

    Args:
        out_dir: where.
        epochs: how long; negative values are a user error.
        names: anything.
    """
    from datamodules.utils.errors import UserInputError

    if epochs < 0:
        raise UserInputError(f"epochs={epochs} must be >= 0")
    return {"out_dir": out_dir, "epochs": epochs, "names": names}


def test_run_study_merges_config_overrides_and_interpolation(tmp_path) -> None:
    config = tmp_path / "toy.yaml"
    config.write_text("out_dir: runs/toy\nnames: ['${out_dir}/a']\n")
    assert run_study(toy_study, ["--config", str(config), "--epochs=5"]) == {
        "out_dir": "runs/toy", "epochs": 5, "names": ("runs/toy/a",)}
    assert run_study(toy_study, ["--config", str(config), "--out_dir=elsewhere"])["names"] == ("elsewhere/a",)


@pytest.mark.parametrize("args", [["--epoch=5"], ["--epochs=many"], ["--config", "{config}"], ["--epochs=-1"]],
                         ids=["abbreviated key", "wrong type", "typo in config", "user error in study"])
def test_run_study_user_errors_exit_2_with_one_paragraph(args, tmp_path, capsys) -> None:
    config = tmp_path / "toy.yaml"
    config.write_text("out_dir: runs/toy\nepoch: 5\n")
    with pytest.raises(SystemExit) as exit_info:
        run_study(toy_study, ["--out_dir=x", *[a.replace("{config}", str(config)) for a in args]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one paragraph, no usage text, no traceback
    assert "epoch" in err


def test_one_paragraph() -> None:
    assert one_paragraph('Parser key "runs":\n  Problem:\n    Option \'x\' is not accepted\n') == (
        'Parser key "runs": Problem: Option \'x\' is not accepted')


def study_module(target: str):
    return importlib.import_module(f"lightning_modules.studies.{STUDIES[target]}")


@pytest.mark.parametrize("target", sorted(STUDIES))
def test_every_study_is_a_typed_function_behind_run_study(target) -> None:
    module = study_module(target)
    study = getattr(module, STUDIES[target])
    parser = study_parser(study)  # every parameter typed, or auto_parser refuses it
    documented = {action.dest: action.help for action in parser._actions}
    for name in __import__("inspect").signature(study).parameters:
        assert documented.get(name), f"{module.__name__}.{STUDIES[target]}: parameter {name!r} is not documented"
    assert "run_study(" in Path(module.__file__).read_text()


def test_makefile_launches_every_study_one_way() -> None:
    """Each study target: `$(PY) -m lightning_modules.studies.<module> --config <existing yaml>` (nothing else)."""
    makefile = (REPO / "Makefile").read_text()
    launches = re.findall(r"^\t.*lightning_modules\.studies.*$", makefile, flags=re.M)
    pattern = re.compile(r"\t\$\(PY\) -m lightning_modules\.studies\.(\w+) --config (\S+\.yaml)")
    found = {}
    for line in launches:
        match = pattern.fullmatch(line)
        assert match, f"Makefile: {line.strip()!r} is not the one launch style"
        assert (REPO / match[2]).is_file(), match[2]
        found[match[1]] = match[2]
    assert set(found) == set(STUDIES.values())
    for target, module in STUDIES.items():
        assert re.search(rf"^{re.escape(target)}:.*\n(\t.*\n)*\t.*studies\.{module} ", makefile, flags=re.M), target
        if target != "demo":
            assert found[module].startswith(f"configs/studies/{target}/")


def test_padding_bench_end_to_end(tmp_path, capsys) -> None:
    out = tmp_path / "padding"
    summary = run_study(study_module("padding-bench").padding_benchmark, [
        "--config", str(REPO / "configs/studies/padding-bench/padding.yaml"), f"--out_dir={out}",
        "--n_pairs=500", "--batch_sizes=[4, 16]"])
    assert json.loads((out / "summary.json").read_text()) == summary and summary["n_pairs"] == 500
    lines = (out / "summary.md").read_text().splitlines()
    assert lines[-3] == "|---|---|---|---|"
    assert re.fullmatch(r"\| 16 \| \d+\.\d% \| \d+\.\d% \| \d+\.\d× \|", lines[-1])
    assert (out / "padding.png").read_bytes()[:8] == PNG
    assert "| batch size | padding, random batches |" in capsys.readouterr().out


def test_reference_quant_bench_end_to_end(tmp_path) -> None:
    """A tiny random model through the benchmark's real path (bitsandbytes on CPU)."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "quant"
    summary = run_study(study_module("reference-quant-bench").quantization_benchmark, [
        "--config", str(REPO / "configs/studies/reference-quant-bench/quantization.yaml"), f"--out_dir={out}",
        "--max_pairs=8", "--batch_size=4", f"--demo_model={tmp_path / 'none'}", "--levels=[none, 8bit]",
        "--random_model={hidden_size: 64, num_layers: 1, num_heads: 2, intermediate_size: 128}"])
    assert [r["quantization"] for r in summary["rows"]] == ["none", "8bit"]
    base, quantized = summary["rows"]
    assert base["mean_abs_dlogp_seq"] == 0.0 and quantized["memory_ratio"] < 1.0
    assert json.loads((out / "summary.json").read_text()) == summary
    kilo = round(base["parameters"] / 1e3)
    assert f"| random {kilo}K | 8bit |" in (out / "summary.md").read_text() and (out / "quantization.png").exists()


def test_quant_bench_rejects_levels_without_the_float32_baseline(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "lightning_modules.studies.quantization_benchmark",
                             f"--out_dir={tmp_path}", "--levels=[8bit, none]"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "first level must be 'none'" in result.stderr
