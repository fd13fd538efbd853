"""`python -m datamodules describe --config CONFIG [--data.init_args.KEY=VALUE ...]`: look at the data.

For each split the config's data module prepares, it prints:
- rows kept, and rows dropped by reason (and how many were truncated);
- token-length percentiles of prompts and responses;
- one rendered example, with the tokens the loss is taken on shown between ⟦ and ⟧.

Takes a full experiment config (the tokenizer comes from `model.init_args.model_name_or_path`) or a
`configs/data/*.yaml` file (pass `--tokenizer`). Only the data section is parsed.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from datamodules.text_data import TextDataModule
from datamodules.tokenize import IGNORE_INDEX
from datamodules.utils.errors import UserInputError, exit_on_user_error

PERCENTILES = (5, 25, 50, 75, 95, 100)


def build_datamodule(config: str, overrides: list[str], tokenizer: str | None = None) -> TextDataModule:
    """The data module of `config` (its `data` section) with command-line `--data.*` overrides applied."""
    from jsonargparse import ArgumentParser

    full = yaml.safe_load(Path(config).read_text()) or {}
    if "data" not in full:
        raise UserInputError(f"{config}: no `data` section to describe")
    data = full["data"]
    data.setdefault("init_args", {})
    model_path = (full.get("model") or {}).get("init_args", {}).get("model_name_or_path")
    data["init_args"]["tokenizer_name_or_path"] = tokenizer or data["init_args"].get("tokenizer_name_or_path") or model_path
    if data["init_args"]["tokenizer_name_or_path"] is None:
        raise UserInputError(f"{config} names no model to take the tokenizer from: pass --tokenizer PATH_OR_HUB_ID")
    parser = ArgumentParser(parser_mode="omegaconf+", exit_on_error=False)
    parser.add_argument("--config", action="config")
    parser.add_subclass_arguments(TextDataModule, "data", required=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump({"data": data}, f)
    try:
        parsed = parser.parse_args(["--config", f.name, *overrides])
    except Exception as error:  # jsonargparse's ArgumentError: a bad key or value
        raise UserInputError(f"{config}: {error}") from error
    finally:
        Path(f.name).unlink()
    return parser.instantiate_classes(parsed).data


def length_fields(item: dict[str, Any]) -> dict[str, int]:
    """Token counts of one prepared item: prompt and each response (labels != IGNORE are the response)."""
    if "chosen_labels" in item:
        labels = {"chosen": item["chosen_labels"], "rejected": item["rejected_labels"]}
    elif "labels" in item:
        labels = {"response": item["labels"]}
    else:
        return {"prompt": item["prompt_length"]}
    first = next(iter(labels.values()))
    out = {"prompt": sum(1 for label in first if label == IGNORE_INDEX)}
    out.update({name: sum(1 for label in ls if label != IGNORE_INDEX) for name, ls in labels.items()})
    return out


def render_example(tokenizer, item: dict[str, Any]) -> str:
    """The first sequence of `item` as text, trained-on tokens between ⟦ and ⟧."""
    key = "chosen_" if "chosen_input_ids" in item else ""
    if f"{key}input_ids" not in item:
        return repr(item["prompt"])
    ids, labels = item[f"{key}input_ids"], item[f"{key}labels"]
    prompt = [t for t, label in zip(ids, labels) if label == IGNORE_INDEX]
    trained = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    return tokenizer.decode(prompt) + "⟦" + tokenizer.decode(trained) + "⟧"


def describe(dm: TextDataModule) -> dict[str, Any]:
    """Prepare every configured split of `dm` and summarise it (also returned as a dict)."""
    dm.setup(None)
    report: dict[str, Any] = {}
    for role, items in dm.data.items():
        stats = dm.stats[role].as_dict()
        lengths: dict[str, list[int]] = {}
        for item in items:
            for name, n in length_fields(item).items():
                lengths.setdefault(name, []).append(n)
        report[role] = {
            "split": dm.splits[role],
            "rows": stats,
            "token_percentiles": {name: dict(zip(map(str, PERCENTILES), np.percentile(v, PERCENTILES).round(1).tolist()))
                                  for name, v in lengths.items()},
            "example": render_example(dm.tokenizer, items[0]),
        }
    return report


def print_report(report: dict[str, Any]) -> None:
    for role, part in report.items():
        rows = part["rows"]
        print(f"\n== {role} (split {part['split']!r}) ==")
        print(f"kept {rows['kept']}, dropped {rows['dropped_total']} {rows['dropped'] or ''}, truncated {rows['truncated']}")
        print("tokens  " + "  ".join(f"p{p:>3}" for p in PERCENTILES))
        for name, values in part["token_percentiles"].items():
            print(f"{name:<8}" + "  ".join(f"{v:>4.0f}" for v in values.values()))
        print(f"example (trained-on tokens in ⟦ ⟧):\n{part['example']}")


def main(argv: list[str] | None = None) -> None:
    import argparse

    args = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m datamodules", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("describe", help="rows kept/dropped, token-length percentiles and an example per split")
    d.add_argument("--config", required=True, help="experiment config or configs/data/*.yaml")
    d.add_argument("--tokenizer", help="tokenizer path or hub id (default: the config's model)")
    d.add_argument("--json", help="also write the report to this JSON file")
    known, overrides = parser.parse_known_args(args)
    with exit_on_user_error():
        report = describe(build_datamodule(known.config, overrides, known.tokenizer))
    print_report(report)
    if known.json:
        Path(known.json).write_text(json.dumps(report, indent=2))
