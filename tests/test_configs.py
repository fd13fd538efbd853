"""Every YAML under `configs/` parses and instantiates with the entry point that runs it.

Training configs (top-level `model` + `data`) go through `lightning_modules.cli.main(run=False)`,
which builds the trainer, the model and the datamodule without fitting. Their input paths point at
the `assets` fixture and every output path (`runs/...`) into `tmp_path`, through a rewritten copy of
the YAML (`localize`), so nothing is written into the repository. Instantiation must stay cheap:
weights and tokenizers load only in `configure_model` / `setup`, which this test forbids.
Study configs (`configs/studies/<target>/*.yaml` that are not training configs, and the demo's
`configs/quickstart/evaluate.yaml`) go through their study's own parser (`launch.study_parser`), so a
misspelt key fails here as it would on the command line. Hardware setups (`configs/strategy/*.yaml`) are
partial configs meant as a second `--config`: each is stacked onto the localized quickstart DPO config with
only `accelerator: cpu` added, and built (`tests/test_strategy_configs.py` checks them in depth). A config
that matches none fails, so a new kind of config gets an entry point here.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import yaml
from transformers import AutoModelForCausalLM

import datamodules.text_data
from datamodules import PreferenceDataModule, PromptDataModule, SFTDataModule
from lightning_modules.cli import main
from lightning_modules.policy import PolicyModule
from lightning_modules.runtime.run_dir import resolve_in_run_dir
from lightning_modules.studies import STUDIES
from lightning_modules.studies.launch import study_parser

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
# the on-policy study and the generation benchmark (until lightning_modules.studies.STUDIES lists them)

# Which asset folder feeds each datamodule class (most specific first).
DATA_FOLDERS: list[tuple[type, str]] = [(PreferenceDataModule, "data/prefs"), (SFTDataModule, "data/sft"),
                                        (PromptDataModule, "data/prompts")]
# Input paths, by key, wherever they appear in the config.
INPUT_PATHS = {"model_name_or_path": "model", "reference_name_or_path": "model",
               "prompts_path": "data/prompts/test.jsonl"}


def import_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def data_folder(class_path: str) -> str | None:
    cls = import_class(class_path)
    return next((folder for base, folder in DATA_FOLDERS if issubclass(cls, base)), None)


def localize(config: dict[str, Any], assets: Path, out: Path) -> dict[str, Any]:
    """A copy of a training config reading from `assets` and writing under `out`.

    Known inputs (`INPUT_PATHS` keys, `data.init_args.path`) are replaced by their asset; any other
    repository-relative `runs/...` string (checkpoints, logs, exports, metrics) moves under `out`.
    """

    def walk(node: Any, key: str | None = None) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, k) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, key) for v in node]
        if isinstance(node, str) and key in INPUT_PATHS:
            return str(assets / INPUT_PATHS[key])
        if isinstance(node, str) and node.startswith("runs/"):
            return str(out / node)
        return node

    local = walk(config)
    trainer = local.get("trainer", {})
    if trainer.get("accelerator") not in (None, "cpu", "auto"):  # full-scale GPU configs: build on CPU here
        trainer.update(accelerator="cpu", devices=1, strategy="auto", precision="32-true")
    folder = data_folder(local["data"]["class_path"])
    if folder is not None:
        local["data"]["init_args"]["path"] = str(assets / folder)
    return local


def write_localized(path: Path, assets: Path, out: Path) -> Path:
    """`localize` the YAML at `path` and write it to `out/<name>`; return the new file."""
    local = localize(yaml.safe_load(path.read_text()), assets, out)
    target = out / path.name
    target.write_text(yaml.safe_dump(local, sort_keys=False))
    return target


def is_training_config(config: dict[str, Any]) -> bool:
    return {"model", "data"} <= config.keys()


def is_data_config(config: dict[str, Any]) -> bool:
    return config.keys() == {"data"}


def is_strategy_config(path: Path) -> bool:
    """A hardware setup of configs/strategy/: trainer and model keys only, composed onto an experiment."""
    return path.parent == REPO / "configs/strategy"


def is_bandit_config(config: dict[str, Any]) -> bool:
    """A training config of the bandit (configs/bandit/): no model weights, no tokenizer, no dataset files."""
    return is_training_config(config) and config["model"]["class_path"].startswith("lightning_modules.bandit.")


def is_evaluation_config(config: dict[str, Any]) -> bool:
    return {"policies", "prompts_path", "reward"} <= config.keys()


def study_of(path: Path, config: dict[str, Any]) -> str | None:
    """The study module whose parser reads this config: its folder's (configs/studies/<target>/), or evaluate."""
    parts = path.relative_to(REPO / "configs").parts
    if parts[0] == "studies" and not is_training_config(config):
        assert parts[1] in STUDIES, f"{path}: configs/studies/{parts[1]}/ is not a study target of {sorted(STUDIES)}"
        return STUDIES[parts[1]]
    return STUDIES["demo"] if is_evaluation_config(config) else None


def study_function(module: str):
    return getattr(importlib.import_module(f"lightning_modules.studies.{module}"), module)


STUDY_CONFIGS = [p for p in CONFIGS if study_of(p, yaml.safe_load(p.read_text()))]


def under(path: str | Path, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root.resolve())


def test_configs_are_found():
    names = {p.relative_to(REPO / "configs").as_posix() for p in CONFIGS}
    assert {"quickstart/sft.yaml", "quickstart/dpo.yaml"} <= names


def test_localize_rewrites_inputs_and_outputs(tmp_path):
    config = {
        "trainer": {"default_root_dir": "runs/demo", "callbacks": [
            {"class_path": "x.Cb", "init_args": {"dirpath": "runs/demo/ckpt", "prompts_path": "runs/p.jsonl"}}]},
        "model": {"class_path": "lightning_modules.dpo.DPOModule",
                  "init_args": {"model_name_or_path": "org/big-model", "reference_name_or_path": None}},
        "data": {"class_path": "datamodules.PreferenceDataModule", "init_args": {"path": "org/pairs"}},
    }
    local = localize(config, Path("/a"), tmp_path)
    assert local["trainer"]["default_root_dir"] == str(tmp_path / "runs/demo")
    assert local["trainer"]["callbacks"][0]["init_args"] == {
        "dirpath": str(tmp_path / "runs/demo/ckpt"), "prompts_path": "/a/data/prompts/test.jsonl"}
    assert local["model"]["init_args"] == {"model_name_or_path": "/a/model", "reference_name_or_path": None}
    assert local["data"]["init_args"]["path"] == "/a/data/prefs"
    assert config["data"]["init_args"]["path"] == "org/pairs"  # the input is not modified


@pytest.fixture
def no_loading(monkeypatch):
    """Make any weight or tokenizer load fail: instantiating a config must not do either."""
    monkeypatch.setattr(sys, "argv", ["lightning_modules"])  # `main(args)` must not see pytest's argv

    def refuse(*args, **kwargs):
        raise AssertionError(f"loaded during instantiation: {args}")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(datamodules.text_data, "load_tokenizer", refuse)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.relative_to(REPO / "configs").as_posix() for p in CONFIGS])
def test_config_instantiates(path, assets, tmp_path, no_loading, capsys):
    config = yaml.safe_load(path.read_text())
    if is_bandit_config(config):
        check_bandit_config(config, path, assets, tmp_path)
    elif is_training_config(config):
        check_training_config(config, path, assets, tmp_path)
    elif is_data_config(config):
        check_data_config(config, path)
    elif is_strategy_config(path):
        check_strategy_config(config, path, assets, tmp_path)
    elif study := study_of(path, config):
        check_study_config(study, config, path, capsys)
    else:
        pytest.fail(f"{path}: no known entry point parses this config; teach tests/test_configs.py about it")


def check_training_config(config: dict[str, Any], path: Path, assets: Path, tmp_path: Path) -> None:
    local = write_localized(path, assets, tmp_path)
    cli = main(["--config", str(local)], run=False)

    model_class = import_class(config["model"]["class_path"])
    assert type(cli.model) is model_class and isinstance(cli.model, PolicyModule)
    assert cli.model.policy is None  # weights arrive in configure_model, not in __init__
    assert type(cli.datamodule) is import_class(config["data"]["class_path"])
    assert cli.datamodule.tokenizer is None and not cli.datamodule.data
    # the CLI links the tokenizer to the model; the config never repeats it
    assert cli.datamodule.tokenizer_name_or_path == cli.model.model_name_or_path == str(assets / "model")
    for key, value in config["data"].get("init_args", {}).items():  # plain values reach the object
        if key != "path" and hasattr(cli.datamodule, key) and not str(value).startswith("${"):
            actual = getattr(cli.datamodule, key)
            if dataclasses.is_dataclass(actual):  # e.g. study_split: compare the fields the YAML sets
                assert all(getattr(actual, k) == (tuple(v) if isinstance(v, list) else v) for k, v in value.items()), key
            elif isinstance(actual, list) and actual and dataclasses.is_dataclass(actual[0]):  # e.g. reference_cache
                assert len(actual) == len(value), key
                for item, given in zip(actual, value):  # paths are localized: compare the other fields
                    assert all(getattr(item, k) == v for k, v in given.items() if k != "name_or_path"), key
            else:
                assert actual == value, key

    assert isinstance(cli.trainer, L.Trainer)
    configured = [c["class_path"].rpartition(".")[2] for c in config.get("trainer", {}).get("callbacks", [])]
    present = [type(c).__name__ for c in cli.trainer.callbacks]
    assert all(name in present for name in configured), (configured, present)
    # every output location is inside tmp_path
    assert under(cli.trainer.default_root_dir, tmp_path)
    if cli.trainer.logger is not None:
        assert under(cli.trainer.logger.save_dir, tmp_path)
    for callback in cli.trainer.callbacks:  # a relative output path is inside the run directory
        for attr in ("dirpath", "path"):
            if getattr(callback, attr, None) is not None:
                where = resolve_in_run_dir(getattr(callback, attr), cli.trainer)
                assert under(where, tmp_path), (type(callback).__name__, attr, where)


def check_bandit_config(config: dict[str, Any], path: Path, assets: Path, tmp_path: Path) -> None:
    """Builds the bandit's module and data module through the CLI; the environment waits for `setup`."""
    cli = main(["--config", str(write_localized(path, assets, tmp_path))], run=False)
    assert type(cli.model) is import_class(config["model"]["class_path"])
    assert type(cli.datamodule) is import_class(config["data"]["class_path"])
    assert cli.datamodule.environment is None  # built in setup, not in __init__
    for key, value in config["data"].get("init_args", {}).items():
        assert getattr(cli.datamodule, key) == value, key
    for key in ("mode", "num_samples", "reuse", "beta"):
        if key in config["model"]["init_args"]:
            assert getattr(cli.model, key) == config["model"]["init_args"][key], key
    assert under(cli.trainer.default_root_dir, tmp_path)
    if cli.trainer.logger is not None:
        assert under(cli.trainer.logger.save_dir, tmp_path)


@pytest.mark.parametrize("path", [p for p in CONFIGS if is_training_config(yaml.safe_load(p.read_text()))],
                         ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_training_config_validates_as_written(path, capsys, no_loading):
    """Every key and type of the file as shipped (GPU settings, hub ids) parses; nothing is instantiated."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    config = yaml.safe_load(path.read_text())
    if is_bandit_config(config):  # no model path: the data module must not have grown a linked tokenizer either
        assert printed["model"]["class_path"] == config["model"]["class_path"]
        assert "tokenizer_name_or_path" not in printed["data"]["init_args"]
        return
    assert printed["model"]["init_args"]["model_name_or_path"] == config["model"]["init_args"]["model_name_or_path"]


def check_strategy_config(config: dict[str, Any], path: Path, assets: Path, tmp_path: Path) -> None:
    """Quickstart DPO + this file + `accelerator: cpu` builds, with the file's strategy class and device count."""
    assert set(config) <= {"trainer", "model"}, f"{path}: a hardware setup sets trainer and model keys only"
    experiment = write_localized(REPO / "configs/quickstart/dpo.yaml", assets, tmp_path)
    cpu = tmp_path / "cpu.yaml"
    cpu.write_text(yaml.safe_dump({"trainer": {"accelerator": "cpu"}}))
    cli = main(["--config", str(experiment), "--config", str(path), "--config", str(cpu)], run=False)
    strategy = config["trainer"]["strategy"]
    if isinstance(strategy, dict):
        assert type(cli.trainer.strategy) is import_class(strategy["class_path"])
    assert cli.trainer.num_devices == config["trainer"]["devices"]
    assert cli.trainer.precision_plugin.precision == config["trainer"]["precision"]
    assert cli.model.policy is None and under(cli.trainer.default_root_dir, tmp_path)


def check_data_config(config: dict[str, Any], path: Path) -> None:
    """`configs/data/*.yaml` build through `datamodules describe`'s parser: right class, values, nothing loaded."""
    from datamodules.describe import build_datamodule
    from datamodules.multiref_split import StudySplit

    dm = build_datamodule(str(path), [], tokenizer="some-org/some-tokenizer")
    assert type(dm) is import_class(config["data"]["class_path"])
    assert dm.tokenizer is None and not dm.data
    for key, value in config["data"]["init_args"].items():
        if key == "study_split":
            assert isinstance(dm.study_split, StudySplit) and dm.study_split.tokenizers == tuple(value["tokenizers"])
        elif key.endswith("_split"):
            assert dm.splits[key.removesuffix("_split")] == value or dm.study_split is not None, key
        else:
            assert getattr(dm, key) == value, key


def test_data_config_composes_onto_an_experiment(assets, tmp_path, no_loading):
    """`--config experiment.yaml --config configs/data/X.yaml`: the data section is swapped, the rest kept."""
    experiment = write_localized(REPO / "configs/quickstart/dpo.yaml", assets, tmp_path)
    cli = main(["--config", str(experiment), "--config", str(REPO / "configs/data/refdpo_tulu2.yaml")], run=False)
    dm = cli.datamodule
    assert (dm.path, dm.name, dm.schema, dm.template, dm.max_length) == ("yale-nlp/RefDPO", "tulu2", "refdpo", "zephyr", 2048)
    assert dm.tokenizer_name_or_path == cli.model.model_name_or_path == str(assets / "model")


def check_study_config(study: str, config: dict[str, Any], path: Path, capsys) -> None:
    """Parse with the study's own parser (unknown keys and wrong types fail), build its classes, check per study."""
    parser = study_parser(study_function(study))
    init = parser.instantiate(parser.parse_args(["--config", str(path)]))
    assert set(config) <= set(vars(init)), path
    if study == "evaluate":
        assert type(init.reward) is import_class(config["reward"]["class_path"])
        assert dict(init.policies) == config["policies"]
    elif study == "refdpo_sweep":
        check_sweep_runs(init, capsys)


def check_sweep_runs(init: Any, capsys) -> None:
    """Every run of a sweep is the sweep's DPO config plus overrides: each must parse with the real CLI."""
    names = [run.name for run in init.runs]
    assert len(names) == len(set(names)), "run names must be unique (they name the output folders)"
    for run in init.runs:  # `${out_dir}` in a run's args is already resolved here
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(REPO / init.dpo_config), f"--model.init_args.beta={run.beta}",
                  *run.args, "--print_config"])
        assert exit_info.value.code in (0, None), run.name
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["model"]["init_args"]["beta"] == run.beta


@pytest.mark.parametrize("path", STUDY_CONFIGS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_study_config_with_a_typo_fails(path: Path, tmp_path: Path) -> None:
    """The same file with one key misspelt (`out_dir` -> `out_dirr`) or one extra key does not parse."""
    from jsonargparse import ArgumentError

    parser = study_parser(study_function(study_of(path, yaml.safe_load(path.read_text()))))
    text = path.read_text()
    assert "\nout_dir:" in text
    for typo in (text.replace("\nout_dir:", "\nout_dirr:"), text + "\nmax_new_tokenz: 3\n"):
        (tmp_path / path.name).write_text(typo)
        with pytest.raises(ArgumentError, match=r"out_dirr|max_new_tokenz"):
            parser.parse_args(["--config", str(tmp_path / path.name)])
