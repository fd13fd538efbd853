"""Bad or changed input data (issue 8, data side): what used to load stale rows, print a raw traceback or
quietly do nothing is now either read correctly or a one-paragraph `UserInputError` naming the file, key
or row and what to do.

- stale data: a local dataset folder rewritten with other rows, or another folder of the same name, is
  read afresh (the `datasets` cache is keyed by the content of the local data files);
- bad files: an empty JSONL file, a JSONL file with an invalid line, splits with different columns;
- `max_length` shorter than the prompts: rows with no room for a response token are a policy drop
  (`no_response_tokens`); none left is an error naming data.max_length;
- `test` / `validate` without a test / validation split: an error naming data.test_split / data.val_split.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hub_fixtures as hf
import pytest

from datamodules import PreferenceDataModule, SFTDataModule
from datamodules.loading import cache_dir_for, fingerprint, load_splits
from datamodules.tokenize import IGNORE_INDEX, encode_prompt, load_tokenizer
from datamodules.utils.errors import UserInputError

REPO = Path(__file__).resolve().parents[1]
DPO_YAML = REPO / "configs/quickstart/dpo.yaml"


@pytest.fixture(autouse=True)
def fresh_datasets_cache(tmp_path, monkeypatch):
    """Each test starts from an empty `datasets` cache: no load is served from an earlier test or run."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))


def pairs_dm(path: Path, assets: Path, **kwargs) -> PreferenceDataModule:
    options = dict(val_split=None, max_length=256, batch_size=4)
    return PreferenceDataModule(str(path), str(assets / "model"), **{**options, **kwargs})


def tags(path: Path, assets: Path) -> set[str]:
    """The version tags (`A`, `B`, ...) of the prompts the data module trains on."""
    dm = pairs_dm(path, assets)
    dm.setup("fit")
    texts = [dm.tokenizer.decode(item["chosen_input_ids"]) for item in dm.data["train"]]
    return {text.split("<|user|>\n", 1)[1].split(":", 1)[0] for text in texts}


# ---- 1. stale data --------------------------------------------------------------------------------------------
def test_rewritten_folder_is_read_again(tmp_path, assets) -> None:
    """Before: the second load returned the first version's rows (the cache key ignored the files' content)."""
    folder = hf.write_jsonl_folder(tmp_path / "mydata", {"train": hf.pair_rows("A")})
    assert tags(folder, assets) == {"A"}
    hf.write_jsonl_folder(folder, {"train": hf.pair_rows("B")})  # same size, same row count, other rows
    assert tags(folder, assets) == {"B"}
    hf.write_jsonl_folder(folder, {"train": hf.pair_rows("C", n=7)})
    assert load_splits(str(folder))["train"].num_rows == 7


def test_same_named_folder_elsewhere_is_its_own_dataset(tmp_path, assets) -> None:
    """Before: tmp/b/mydata came back with the rows of tmp/a/mydata."""
    a = hf.write_jsonl_folder(tmp_path / "a/mydata", {"train": hf.pair_rows("A")})
    b = hf.write_jsonl_folder(tmp_path / "b/mydata", {"train": hf.pair_rows("B", n=5)})
    assert tags(a, assets) == {"A"}
    assert tags(b, assets) == {"B"}
    assert load_splits(str(b))["train"].num_rows == 5
    assert load_splits(str(a))["train"].num_rows == 4


def test_rewritten_single_file_is_read_again(tmp_path) -> None:
    path = tmp_path / "pairs.jsonl"
    hf._jsonl(path, hf.pair_rows("A"))
    assert load_splits(str(path))["train"][0]["prompt"].startswith("A:")
    hf._jsonl(path, hf.pair_rows("B"))
    assert load_splits(str(path))["train"][0]["prompt"].startswith("B:")


def test_fingerprint_follows_the_data_files(tmp_path) -> None:
    """The key of the reference caches and study splits: stable for the same files, new for other rows.

    Before: a rewritten folder kept its fingerprint (stale reference caches and study splits)."""
    folder = hf.write_jsonl_folder(tmp_path / "mydata", {"train": hf.pair_rows("A")})
    first = fingerprint(load_splits(str(folder))["train"], str(folder))
    assert fingerprint(load_splits(str(folder))["train"], str(folder)) == first
    cache = cache_dir_for(str(folder))  # derived files beside the data do not change its identity
    cache.mkdir()
    (cache / "derived.json").write_text("{}")
    assert fingerprint(load_splits(str(folder))["train"], str(folder)) == first
    hf.write_jsonl_folder(folder, {"train": hf.pair_rows("B")})
    assert fingerprint(load_splits(str(folder))["train"], str(folder)) != first


# ---- 3a-c. bad files ------------------------------------------------------------------------------------------
def test_empty_train_file(tmp_path, assets) -> None:
    """Before: a bare StopIteration from inside `datasets`."""
    folder = hf.write_jsonl_folder(tmp_path / "prefs", {"train": "", "validation": hf.pair_rows("A")})
    with pytest.raises(UserInputError, match=r"data/train\.jsonl.*\(train split\) is empty"):
        pairs_dm(folder, assets).setup("fit")


def test_empty_single_file(tmp_path, assets) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n")
    with pytest.raises(UserInputError, match=r"pairs\.jsonl.*is empty"):
        pairs_dm(path, assets).setup("fit")


def test_invalid_jsonl_line(tmp_path, assets) -> None:
    """Before: DatasetGenerationError ("An error occurred while generating the dataset") and a traceback."""
    good = hf.pair_rows("A", n=3)
    text = "".join(json.dumps(row) + "\n" for row in good[:2]) + '{"prompt": "Hi", "chosen": oops}\n' + \
        json.dumps(good[2]) + "\n"
    folder = hf.write_jsonl_folder(tmp_path / "prefs", {"train": text})
    with pytest.raises(UserInputError, match=r"data/train\.jsonl \(train split\) line 3 is not valid JSON"):
        pairs_dm(folder, assets).setup("fit")


def test_splits_with_different_columns(tmp_path, assets) -> None:
    """Before: a CastError traceback from `datasets` ("column names don't match")."""
    sft = [{"prompt": row["prompt"], "response": row["chosen"]} for row in hf.pair_rows("A")]
    folder = hf.write_jsonl_folder(tmp_path / "prefs", {"train": hf.pair_rows("A"), "validation": sft})
    with pytest.raises(UserInputError) as error:
        pairs_dm(folder, assets, val_split="validation").setup("fit")
    message = str(error.value)
    assert "different columns" in message and "\n" not in message
    for part in ("data/train.jsonl", "data/validation.jsonl", "'chosen'", "'response'"):
        assert part in message


# ---- 3d. max_length shorter than the prompts -----------------------------------------------------------------
def test_max_length_shorter_than_every_prompt(assets) -> None:
    """Before: every row was kept (truncated) and training ran on nothing useful, exit status 0."""
    dm = pairs_dm(assets / "data/prefs", assets, max_length=4)
    with pytest.raises(UserInputError, match=r"no usable rows.*no_response_tokens.*data\.max_length=4"):
        dm.setup("fit")
    sft = SFTDataModule(str(assets / "data/sft"), str(assets / "model"), val_split=None, max_length=4)
    with pytest.raises(UserInputError, match=r"data\.max_length=4"):
        sft.setup("fit")


@pytest.mark.parametrize("overlength", ["truncate", "drop"])
def test_rows_without_room_for_a_response_are_a_policy_drop(tmp_path, assets, overlength) -> None:
    """Long prompts are dropped as `no_response_tokens` (not counted as malformed); the others are kept."""
    short, long = hf.pair_rows("S", n=6), hf.pair_rows("L" + " and so on" * 40, n=3)
    folder = hf.write_jsonl_folder(tmp_path / "prefs", {"train": short[:3] + long + short[3:]})
    tok = load_tokenizer(str(assets / "model"))
    prompt_lengths = [len(encode_prompt(tok, row["prompt"])) for row in short + long]
    response_lengths = [len(tok(row[side])["input_ids"]) + 1 for row in short for side in ("chosen", "rejected")]
    max_length = max(prompt_lengths[:6]) + max(response_lengths)  # every short row fits whole
    assert min(prompt_lengths[6:]) >= max_length  # no long prompt leaves room for a response token
    dm = pairs_dm(folder, assets, max_length=max_length, max_bad_fraction=0.0, overlength=overlength)
    dm.setup("fit")
    assert dm.stats["train"].as_dict()["dropped"] == {"no_response_tokens": 3}
    assert dm.stats["train"].kept == 6
    for item in dm.data["train"]:
        for side in ("chosen", "rejected"):
            assert any(label != IGNORE_INDEX for label in item[f"{side}_labels"][1:])  # a token to train on


# ---- 3e. test / validate without the split --------------------------------------------------------------------
def test_test_without_a_test_split(assets) -> None:
    """Before: setup('test') prepared nothing and test_dataloader() returned [] (trainer.test tested nothing)."""
    dm = pairs_dm(assets / "data/prefs", assets, test_split=None)
    with pytest.raises(UserInputError, match=r"data\.test_split.*--data\.init_args\.test_split="):
        dm.setup("test")
    with pytest.raises(UserInputError, match=r"data\.test_split"):
        dm.test_dataloader()


def test_validate_without_a_validation_split(assets) -> None:
    dm = pairs_dm(assets / "data/prefs", assets, val_split=None)
    with pytest.raises(UserInputError, match=r"data\.val_split.*splits of data\.path: \['train', 'validation'\]"):
        dm.setup("validate")
    dm.setup("fit")  # fitting without validation is fine
    assert dm.val_dataloader() == []


# ---- through the CLI (in-process): exit status 2, one paragraph, no traceback ---------------------------------
@pytest.fixture
def cli_env(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning_modules"])
    monkeypatch.setenv("COLUMNS", "10000")


def run_main(args: list[str], capsys) -> tuple[int, str]:
    from lightning_modules.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    _, err = capsys.readouterr()
    assert "Traceback" not in err
    return exit_info.value.code or 0, err


def test_cli_fit_on_an_empty_train_file(tmp_path, assets, cli_env, capsys) -> None:
    from test_configs import write_localized

    folder = hf.write_jsonl_folder(tmp_path / "prefs", {"train": "", "validation": hf.pair_rows("A")})
    config = write_localized(DPO_YAML, assets, tmp_path)
    status, err = run_main(["fit", "--config", str(config), "--trainer.logger=false", "--trainer.callbacks=[]",
                            f"--data.init_args.path={folder}"], capsys)
    assert status == 2
    assert err.startswith("error: ") and "train.jsonl" in err and "empty" in err


def test_cli_test_without_a_test_split(tmp_path, assets, cli_env, capsys) -> None:
    """Before: `test` exited 0 having tested nothing."""
    from test_configs import write_localized

    config = write_localized(DPO_YAML, assets, tmp_path)
    status, err = run_main(["test", "--config", str(config), "--trainer.logger=false", "--trainer.callbacks=[]"],
                           capsys)
    assert status == 2
    assert "data.test_split" in err
