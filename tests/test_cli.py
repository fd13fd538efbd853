"""The command line: help text for every argument, errors without tracebacks, interpolation, links.

The process contract (exit status, stderr, `python -m lightning_modules` wiring) is checked in two
real subprocesses; each pays ~6 s of imports. The breadth (every class's help, each kind of bad input) runs in-process through
`lightning_modules.cli.main`, which is exactly what `__main__` calls: a `SystemExit` there is the
process's exit status, and any other exception would be the traceback a user sees.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import os
import subprocess
import sys
from pathlib import Path

import docstring_parser
import lightning as L
import pytest
import yaml

import callbacks
from lightning_modules.cli import main
from test_configs import write_localized

REPO = Path(__file__).resolve().parents[1]
SFT_YAML = REPO / "configs/quickstart/sft.yaml"
DPO_YAML = REPO / "configs/quickstart/dpo.yaml"

MODULES = ["lightning_modules.dpo.DPOModule", "lightning_modules.sft.SFTModule",
           "lightning_modules.multiref.MultiReferenceModule", "lightning_modules.onpolicy.OnPolicyModule",
           "lightning_modules.sams.pretrain.SamSPretrainModule"]
DATAMODULES = ["datamodules.PreferenceDataModule", "datamodules.SFTDataModule"]
CALLBACKS = [f"callbacks.{name}" for name in callbacks.__all__
             if inspect.isclass(getattr(callbacks, name)) and issubclass(getattr(callbacks, name), L.Callback)]
HELP_GROUPS = [("model", c) for c in MODULES] + [("data", c) for c in DATAMODULES] + \
              [("trainer.callbacks", c) for c in CALLBACKS]


def import_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def one_line(text: str) -> str:
    return " ".join(text.split())


def init_descriptions(cls: type) -> dict[str, str | None]:
    """Every `__init__` argument of `cls` → its docstring description (None if undocumented).

    Follows `*args` / `**kwargs` up the MRO, as jsonargparse does: a class that forwards them
    accepts its parent's arguments too, documented in the parent's `__init__` docstring.
    """
    found: dict[str, str | None] = {}
    fixed: set[str] = set()  # keywords a subclass passes to super().__init__ itself: not the user's (as jsonargparse)
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        init = vars(klass)["__init__"]
        docs = {p.arg_name: p.description for p in docstring_parser.parse(init.__doc__ or "").params}
        params = list(inspect.signature(init).parameters.values())[1:]  # drop self
        for p in params:
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in fixed:
                found.setdefault(p.name, docs.get(p.name))
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
        fixed |= super_init_keywords(init) - set(found)
    return found


def super_init_keywords(init) -> set[str]:
    """The keyword names an `__init__` passes explicitly in its `super().__init__(...)` call."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(init)))
    return {kw.arg for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr == "__init__" for kw in node.keywords
            if kw.arg is not None}


def help_entries(text: str, prefix: str) -> dict[str, str]:
    """`--prefix.name` option → its help text (whitespace collapsed), from a `--X.help CLASS` page."""
    body = one_line(text.split("Help for --", 1)[1])
    entries = {}
    for chunk in body.split(f" --{prefix}.")[1:]:
        name, _, rest = chunk.partition(" ")
        name = name.rstrip("+")  # a list option also has an appending alias `--prefix.name+`
        entries[name] = f"{entries[name]} {rest}" if name in entries else rest
    return entries


@pytest.fixture
def cli_env(monkeypatch):
    """In-process `main`: no pytest argv, and help pages too wide to wrap."""
    monkeypatch.setattr(sys, "argv", ["lightning_modules"])
    monkeypatch.setenv("COLUMNS", "10000")


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    """Exit status, stdout, stderr of `main(args)`; fails on any other exception or a printed traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return exit_info.value.code or 0, out, err


# ---- process contract (subprocesses: ~6 s of imports each, so only two) ---------------------


def run_module(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_modules", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "COLUMNS": "10000"})


@pytest.mark.slow
def test_fit_help():
    result = run_module("fit", "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--config", "--model ", "--data ", "--trainer.max_steps", "--trainer.callbacks", "--print_config"):
        assert option in result.stdout


@pytest.mark.slow
def test_missing_data_exits_2_without_traceback(assets, tmp_path):
    """The quickstart run before its assets exist: a relative `runs/...` path, reached only in `fit`."""
    config = write_localized(SFT_YAML, assets, tmp_path)
    result = run_module("fit", "--config", str(config), "--trainer.logger=false",
                        "--data.init_args.path=runs/does-not-exist/sft")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "data.path='runs/does-not-exist/sft'" in result.stderr
    assert not (REPO / "runs/does-not-exist").exists()


# ---- breadth (in-process) -------------------------------------------------------------------


@pytest.mark.parametrize("class_path", MODULES + DATAMODULES + CALLBACKS + ["lightning_modules.sams.SamS"])
def test_every_init_argument_is_documented(class_path):
    descriptions = init_descriptions(import_class(class_path))
    assert descriptions
    undocumented = [name for name, text in descriptions.items() if not text or "\n" in text.strip()]
    assert not undocumented, f"{class_path}: no one-line docstring description for {undocumented}"


def test_init_descriptions_follows_kwargs():
    from datamodules import PreferenceDataModule, TextDataModule

    inherited = init_descriptions(PreferenceDataModule)
    own = set(inspect.signature(TextDataModule.__init__).parameters) - {"self"}
    assert set(inherited) == own | {"reference_columns", "study_split", "reference_cache", "return_prompts",
                                    "label_noise", "label_noise_seed"}
    assert inherited["max_length"] == init_descriptions(TextDataModule)["max_length"]


@pytest.mark.parametrize("group, class_path", HELP_GROUPS, ids=[c for _, c in HELP_GROUPS])
def test_class_help_describes_every_argument(group, class_path, cli_env, capsys):
    status, out, _ = run_main(["fit", f"--{group}.help", class_path], capsys)
    assert status == 0
    entries = help_entries(out, group)
    for name, description in init_descriptions(import_class(class_path)).items():
        if name not in entries and any(key.startswith(f"{name}.") for key in entries):
            continue  # a dataclass argument (e.g. OnPolicyModule's sampling): the help lists its fields
        assert name in entries, f"{class_path}: --{group}.{name} missing from the help"
        assert one_line(description) in entries[name], f"{class_path}: --{group}.{name} help lacks its description"


@pytest.mark.parametrize("name", ["CDPO", "MRPO"])
def test_objective_options_are_listed_in_help(name, cli_env, capsys):
    """Typed objective options appear, described, under `--model.init_args.objective.help NAME`."""
    from lightning_modules import objectives

    status, out, _ = run_main(["fit", "--model=lightning_modules.dpo.DPOModule",
                               "--model.init_args.objective.help", name], capsys)
    assert status == 0
    entries = help_entries(out, "objective")  # jsonargparse names them relative to the subclass
    descriptions = init_descriptions(getattr(objectives, name))
    assert descriptions and set(descriptions) <= set(entries)
    for option, description in descriptions.items():
        assert one_line(description) in entries[option]


@pytest.mark.parametrize("override, names", [
    ("--model.init_args.betaa=0.1", ["betaa"]),
    ("--model.init_args.beta=abc", ["beta", "abc"]),
    ("--model.init_args.objective=nonsense", ["objective", "nonsense"]),
    ("--trainer.max_stepz=3", ["max_stepz"]),
])
def test_bad_command_line_value(override, names, assets, tmp_path, cli_env, capsys):
    config = write_localized(DPO_YAML, assets, tmp_path)
    status, _, err = run_main(["fit", "--config", str(config), override], capsys)
    assert status == 2
    assert all(name in err for name in names), err


def test_misspelled_key_in_yaml(assets, tmp_path, cli_env, capsys):
    config = yaml.safe_load(write_localized(SFT_YAML, assets, tmp_path).read_text())
    config["model"]["init_args"]["reductoin"] = config["model"]["init_args"].pop("reduction")
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    status, _, err = run_main(["fit", "--config", str(path)], capsys)
    assert status == 2
    assert "reductoin" in err


@pytest.mark.parametrize("data_path", ["/does/not/exist", "does-not-exist/either/sft"])
def test_missing_data_path(data_path, assets, tmp_path, cli_env, capsys, monkeypatch):
    config = write_localized(SFT_YAML, assets, tmp_path)
    monkeypatch.chdir(tmp_path)  # a relative path resolves here, not in the repository
    status, _, err = run_main(["fit", "--config", str(config), "--trainer.logger=false",
                               f"--data.init_args.path={data_path}"], capsys)
    assert status == 2
    assert "data.path" in err and data_path in err


def test_data_path_not_given(assets, tmp_path, cli_env, capsys):
    config = yaml.safe_load(write_localized(SFT_YAML, assets, tmp_path).read_text())
    del config["data"]["init_args"]["path"]
    path = tmp_path / "no_path.yaml"
    path.write_text(yaml.safe_dump(config))
    status, _, err = run_main(["fit", "--config", str(path)], capsys)
    assert status == 2
    assert "data" in err and "required" in err and "path" in err


def interpolated_config(assets: Path, tmp_path: Path, reference: str = "${data.init_args.batch_size}") -> Path:
    """An SFT config whose eval_batch_size is an interpolation (batch_size 3 in the file)."""
    path = tmp_path / "interpolated.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"class_path": "lightning_modules.sft.SFTModule",
                  "init_args": {"model_name_or_path": str(assets / "model")}},
        # an absolute key names the file's own keys (no `fit.` prefix needed)
        "data": {"class_path": "datamodules.SFTDataModule",
                 "init_args": {"path": str(assets / "data/sft"), "batch_size": 3, "eval_batch_size": reference}},
    }))
    return path


def test_bad_interpolation_is_a_short_error(assets, tmp_path, cli_env, capsys):
    config = interpolated_config(assets, tmp_path, reference="${data.init_args.no_such_key}")
    status, _, err = run_main(["fit", "--config", str(config), "--print_config"], capsys)
    assert status == 2
    assert "no_such_key" in err and "Traceback" not in err


@pytest.mark.parametrize("reference", ["${data.init_args.batch_size}", "${.batch_size}"])
def test_interpolation_resolves_after_overrides(reference, assets, tmp_path, cli_env, capsys):
    config = interpolated_config(assets, tmp_path, reference)
    status, out, _ = run_main(["fit", "--config", str(config), "--data.init_args.batch_size=7", "--print_config"],
                              capsys)
    assert status == 0
    printed = yaml.safe_load(out)
    assert printed["data"]["init_args"]["batch_size"] == 7
    assert printed["data"]["init_args"]["eval_batch_size"] == 7  # 3 if resolved before the override
    # the config names no tokenizer: the CLI links it from the model, so it is not a setting at all
    assert "tokenizer_name_or_path" not in out
    assert printed["model"]["init_args"]["model_name_or_path"] == str(assets / "model")


def test_tokenizer_follows_the_model_path(assets, tmp_path, cli_env):
    config = write_localized(SFT_YAML, assets, tmp_path)
    elsewhere = str(tmp_path / "some/other/model")
    cli = main(["--config", str(config), f"--model.init_args.model_name_or_path={elsewhere}"], run=False)
    assert cli.model.model_name_or_path == elsewhere
    assert cli.datamodule.tokenizer_name_or_path == elsewhere
