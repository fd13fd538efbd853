"""Every dataset schema through the public path: `PreferenceDataModule(path=...)` as a hub id would take it.

Fixtures (tests/hub_fixtures.py) are folders laid out like the hub repos, written in each exact schema
with deliberately bad rows; these tests check exact kept / dropped-by-reason counts per split, the
trained-on tokens per template, precomputed reference log-probs, per-seed study splits and `describe`.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import hub_fixtures as hf
import pytest

from datamodules import PreferenceDataModule, PromptDataModule
from datamodules.describe import build_datamodule, describe
from datamodules.multiref_split import StudySplit
from datamodules.tokenize import IGNORE_INDEX, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
# (fixture writer, config name, train split, val split, template)
CASES = {
    "ultrafeedback": (hf.write_ultrafeedback, None, "train_prefs", "test_prefs", "auto"),
    "saferlhf": (hf.write_saferlhf, None, "train", None, "auto"),
    **{f"refdpo_{c}": (lambda root, c=c: hf.write_refdpo(root)[c], c, "train", "val", "zephyr")
       for c in ("mistral", "tulu2", "mistral_prior", "mistralv2", "llama3")},
    **{f"alpacafarm_{v}": (lambda root, v=v: hf.write_alpacafarm(root, v), None, "train", "test", "alpacafarm")
       for v in ("minlength", "maxlength", "modelength", "skewexp")},
    "hh": (hf.write_hh, None, "train", "test", "auto"),
    "local_jsonl": (lambda root: hf.write_local_pairs(root / "pairs.jsonl", "jsonl"), None, "train", None, "auto"),
    "local_parquet": (lambda root: hf.write_local_pairs(root / "pairs.parquet", "parquet"), None, "train", None, "auto"),
    "local_messages": (lambda root: hf.write_local_pairs(root / "msgs.jsonl", "jsonl", messages=True), None, "train",
                       None, "auto"),
}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, hf.Fixture]:
    root = tmp_path_factory.mktemp("hub")
    return {case: writer(root) for case, (writer, *_rest) in CASES.items()}


def datamodule(case: str, fixture: hf.Fixture, assets: Path, **kwargs) -> PreferenceDataModule:
    _, name, train, val, template = CASES[case]
    options = dict(name=name, train_split=train, val_split=val, template=template, max_bad_fraction=1.0,
                   max_length=256, batch_size=4)
    return PreferenceDataModule(str(fixture.path), str(assets / "model"), **{**options, **kwargs})


@pytest.mark.parametrize("case", list(CASES))
def test_rows_kept_and_dropped_by_reason(case, fixtures, assets) -> None:
    fixture = fixtures[case]
    dm = datamodule(case, fixture, assets)
    dm.setup("fit")
    for role, split in dm.splits.items():
        if split is None or role not in dm.data:
            continue
        expected = fixture.splits[split]
        stats = dm.stats[role].as_dict()
        assert stats["kept"] == expected.kept == len(dm.data[role]), (case, split)
        assert stats["dropped"] == expected.dropped, (case, split)


@pytest.mark.parametrize("case", ["ultrafeedback", "refdpo_mistral", "refdpo_tulu2", "alpacafarm_minlength", "hh"])
def test_only_the_response_is_trained_on(case, fixtures, assets) -> None:
    """Decoded labelled tokens = the chosen response + end marker; the prompt follows the template."""
    fixture = fixtures[case]
    dm = datamodule(case, fixture, assets)
    dm.setup("fit")
    tok = dm.tokenizer
    raw = [r for r, label in zip(fixture.load()[dm.splits["train"]], fixture.splits[dm.splits["train"]].labels)
           if label is None]
    from datamodules.schemas import normalize_pair

    first = normalize_pair(raw[0], fixture.schema)
    item = dm.data["train"][0]
    ids, labels = item["chosen_input_ids"], item["chosen_labels"]
    trained = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    prompt = [t for t, label in zip(ids, labels) if label == IGNORE_INDEX]
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)  # the mask is a prefix
    end = tok.eos_token
    assert tok.decode(trained) == first["chosen"] + end
    prompt_text = tok.decode(prompt)
    if dm.template == "alpacafarm":
        assert prompt_text.startswith("<|prompter|>") and prompt_text.endswith("<|endoftext|><|assistant|>")
    else:
        assert prompt_text.endswith("<|assistant|>\n") and first["prompt"][-1]["content"] in prompt_text
    if case == "refdpo_mistral":  # insert_eos puts EOS after the user turn
        eos_dm = datamodule(case, fixture, assets, insert_eos=True)
        eos_dm.setup("fit")
        eos_ids = eos_dm.data["train"][0]["chosen_input_ids"]
        assert tok.decode(eos_ids).count(end) == tok.decode(ids).count(end) + sum(
            m["role"] in ("system", "user") for m in first["prompt"])


def test_refdpo_log_probs_reach_the_batch(fixtures, assets) -> None:
    fixture = fixtures["refdpo_llama3"]
    dm = datamodule("refdpo_llama3", fixture, assets, shuffle=False)
    dm.setup("fit")
    kept = [r for r, label in zip(fixture.load()["train"], fixture.splits["train"].labels) if label is None]
    batch = next(iter(dm.train_dataloader()))
    expected = [r["chosen_logprob"] for r in kept[:4]]
    assert batch["ref_chosen_logps"].tolist() == pytest.approx(expected)
    assert all(math.isfinite(v) for v in batch["ref_rejected_logps"].tolist())


def test_truncation_and_drop_policies(fixtures, assets) -> None:
    fixture = fixtures["hh"]
    cut = datamodule("hh", fixture, assets, max_length=100)
    cut.setup("fit")
    dropped = datamodule("hh", fixture, assets, max_length=100, overlength="drop")
    dropped.setup("fit")
    truncated = cut.stats["train"].truncated
    assert truncated > 0
    assert dropped.stats["train"].as_dict()["dropped"]["too_long"] == truncated
    assert dropped.stats["train"].kept == cut.stats["train"].kept - truncated
    assert all(len(item["chosen_input_ids"]) <= 100 for item in cut.data["train"])


def test_missing_config_name_is_a_clear_error(fixtures, assets) -> None:
    from datamodules.utils.errors import UserInputError

    dm = datamodule("refdpo_tulu2", fixtures["refdpo_tulu2"], assets, name=None)
    with pytest.raises(UserInputError, match="data.name=None is required"):
        dm.setup("fit")


def test_study_split_per_seed(fixtures, assets, tmp_path) -> None:
    """Deterministic, cached, seed-dependent train/val/test carved out of one source split."""
    fixture = fixtures["ultrafeedback"]

    def split(seed: int) -> dict[str, list[str]]:
        study = StudySplit(seed=seed, sample_size=8, sizes=(4, 2, 2), percentile=2.5, max_tokens=512,
                           cache_dir=str(tmp_path / "cache"))
        dm = datamodule("ultrafeedback", fixture, assets, study_split=study)
        dm.setup(None)
        return {role: sorted(dm.tokenizer.decode(i["chosen_input_ids"]) for i in dm.data[role])
                for role in ("train", "val", "test")}

    first, again, other = split(0), split(0), split(1)
    assert first == again
    assert first != other
    assert [len(first[r]) for r in ("train", "val", "test")] == [4, 2, 2]
    assert sorted(sum(first.values(), [])) == sorted(sum(other.values(), []))  # same 8-pair sample
    assert not set(first["train"]) & set(first["test"])


def test_one_reference_cache_serves_every_study_seed(fixtures, assets, tmp_path) -> None:
    """The K-reference cache of a study split is keyed by the seed-independent sample, not by each seed's split.

    Before: every seed's train / val / test fingerprinted differently, so seeds 0-4 each scored the same
    7,000 pairs again with all seven references."""
    from datamodules.reference_cache import ReferenceSpec
    from lightning_modules.references.cache_builder import compute_for_datamodule

    fixture = fixtures["ultrafeedback"]

    def study(seed: int) -> PreferenceDataModule:
        split = StudySplit(seed=seed, sample_size=8, sizes=(4, 2, 2), percentile=2.5, max_tokens=512,
                           cache_dir=str(tmp_path / "cache"))
        return datamodule("ultrafeedback", fixture, assets, study_split=split,
                          reference_cache=[ReferenceSpec(str(assets / "model"))])

    first = compute_for_datamodule(study(0))
    assert [(role, result.computed) for role, result in first] == [("study sample", True)]
    again = compute_for_datamodule(study(1))
    assert [(role, result.computed) for role, result in again] == [("study sample", False)]
    assert first[0][1].rows == again[0][1].rows >= 7  # the 8 sampled pairs, distinct ones (fixture rows cycle through QA)
    dm = study(1)
    dm.setup(None)  # every role of seed 1 finds its rows in the one cache
    assert [len(dm.data[role]) for role in ("train", "val", "test")] == [4, 2, 2]
    assert all(len(item["ref_chosen_logps"]) == 1 for role in ("train", "val", "test") for item in dm.data[role])


def test_prompt_datamodule_reads_prompts_of_a_preference_dataset(fixtures, assets) -> None:
    fixture = fixtures["ultrafeedback"]
    dm = PromptDataModule(str(fixture.path), str(assets / "model"), predict_split="test_prefs", max_bad_fraction=1.0)
    dm.setup("predict")
    prompts = [p for batch in dm.predict_dataloader() for p in batch["prompt"]]
    assert len(prompts) == dm.stats["predict"].kept > 0
    assert all(p[-1]["role"] == "user" for p in prompts)


@pytest.mark.parametrize("case", list(CASES))
def test_describe_reports_every_split(case, fixtures, assets) -> None:
    dm = datamodule(case, fixtures[case], assets)
    report = describe(dm)
    for role, part in report.items():
        assert part["rows"] == dm.stats[role].as_dict()
        assert set(part["token_percentiles"]) == {"prompt", "chosen", "rejected"}
        assert "⟦" in part["example"] and part["example"].endswith("⟧")


def test_describe_command_on_a_data_config_and_on_the_synthetic_task(fixtures, assets, tmp_path) -> None:
    runs = {
        "refdpo": ["--config", str(REPO / "configs/data/refdpo_tulu2.yaml"),
                   f"--data.init_args.path={fixtures['refdpo_tulu2'].path}", "--data.init_args.max_bad_fraction=1"],
        "synthetic": ["--config", str(REPO / "configs/quickstart/dpo.yaml"),
                      f"--data.init_args.path={assets / 'data/prefs'}"],
    }
    for name, args in runs.items():
        out = subprocess.run([sys.executable, "-m", "datamodules", "describe", *args, "--tokenizer",
                              str(assets / "model"), "--json", str(tmp_path / f"{name}.json")],
                             capture_output=True, text=True, cwd=REPO, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "== train" in out.stdout and "== val" in out.stdout and "⟦" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "datamodules", "describe", "--config",
                          str(REPO / "configs/data/ultrafeedback.yaml"), "--tokenizer", str(assets / "model"),
                          "--data.init_args.shema=x"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode == 2 and "shema" in bad.stderr and "Traceback" not in bad.stderr


def test_loaded_tokenizer_is_the_assets_one(assets) -> None:  # guards the fixture wiring above
    assert load_tokenizer(str(assets / "model")).eos_token == "</s>"


def test_group_by_length_reduces_padding_in_real_batches(fixtures, assets) -> None:
    from datamodules.samplers import LengthGroupedSampler

    def padding(dm: PreferenceDataModule) -> float:
        dm.setup("fit")
        pad = total = 0
        for batch in dm.train_dataloader():
            mask = batch["chosen_attention_mask"]
            total += mask.numel()
            pad += (mask == 0).sum().item()
        return pad / total

    fixture = fixtures["hh"]
    grouped = datamodule("hh", fixture, assets, group_by_length=True, batch_size=4)
    plain = datamodule("hh", fixture, assets, batch_size=4)
    assert padding(grouped) < padding(plain)
    assert isinstance(grouped.train_dataloader().sampler, LengthGroupedSampler)
    # every kept row appears exactly once per epoch
    rows = sorted(tuple(i) for b in grouped.train_dataloader() for i in b["chosen_input_ids"].tolist())
    assert len(rows) == grouped.stats["train"].kept
