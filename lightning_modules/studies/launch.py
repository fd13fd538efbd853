"""The one way a study starts: a typed function behind a jsonargparse command line.

    python -m lightning_modules.studies.<name> --config configs/studies/<target>/<file>.yaml [--key=value ...]

Every parameter of the study function is a `--key` (documented by the function's docstring, see
`--help`); `--config` files and overrides merge in order, with OmegaConf `${...}` interpolation
(`parser_mode="omegaconf+"`). A misspelt key, a wrong type or a `UserInputError` raised by the
study ends the command with one `error: ...` paragraph and exit status 2 (no traceback).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError, ArgumentParser, auto_cli, auto_parser

from datamodules.utils.errors import UserInputError, exit_on_user_error

# Shared by `run_study` and `study_parser`, so a config that parses in a test parses on the command line.
PARSER_OPTIONS: dict[str, Any] = {
    "parser_mode": "omegaconf+",  # ${...} interpolation across the whole merged config
    "as_positional": False,  # every parameter is a --key, so any of them can come from --config
    "exit_on_error": False,  # parse errors raise ArgumentError; run_study turns them into one paragraph
    "allow_abbrev": False,  # --epoch must not silently mean --epochs
}


def study_parser(study: Callable[..., Any]) -> ArgumentParser:
    """The parser `run_study(study)` uses (tests parse shipped configs with it)."""
    return auto_parser(study, **PARSER_OPTIONS)


def one_paragraph(message: str) -> str:
    """jsonargparse's indented multi-line error as one line: `Parser key "runs": ... Option 'betta' is not accepted`."""
    return re.sub(r"\s*\n\s*", " ", message.strip())


def run_study(study: Callable[..., Any], args: list[str] | None = None) -> Any:
    """Parse `args` (default: sys.argv[1:]) into `study`'s parameters, call it, return what it returns."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with exit_on_user_error():
        try:
            return auto_cli(study, args=args, **PARSER_OPTIONS)
        except ArgumentError as error:
            raise UserInputError(f"{study.__name__}: {one_paragraph(str(error))} (see --help)") from error


def fit_in_process(config: str, args: list[str]) -> Any:
    """`python -m lightning_modules fit --config <config> <args>` in this process; returns the finished LightningCLI.

    The study's own command-line arguments are hidden from the run meanwhile (LightningCLI would warn about them).
    """
    from lightning_modules.cli.app import main as cli_main

    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return cli_main(["fit", "--config", config, *args])
    finally:
        sys.argv = argv


def run_step(name: str, args: list[str], creates: Path | None, log_dir: Path) -> float:
    """Run `python <args>` unless `creates` exists (None: always run; the step is idempotent itself).

    Output goes to `log_dir/<name>.log`. Returns seconds.
    """
    if creates is not None and creates.exists():
        print(f"[study] {name}: reusing {creates}")
        return 0.0
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"[study] {name}: python {' '.join(args)}", flush=True)
    with open(log_dir / f"{name}.log", "w") as log:
        code = subprocess.call([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"[study] {name} failed (exit {code}); see {log_dir / f'{name}.log'}")
    seconds = time.perf_counter() - start
    (log_dir / f"{name}.seconds").write_text(f"{seconds:.1f}\n")  # kept for summaries of resumed studies
    print(f"[study] {name}: {seconds:.0f} s", flush=True)
    return seconds
