"""Cached reference log-probs: `lightning_modules.references.cache_builder`, the (B, K) batch columns, `reference: cached`.

Each test copies a slice of the `assets` pairs into its own folder, so the caches it writes beside
the data start empty. Expected values come from the live reference's `concatenated_forward` or from
a direct forward of the model on hand-built token ids.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
import yaml

import lightning_modules.dpo as dpo_lib
import lightning_modules.references.cache_builder as rc
from conftest import TINY_MODEL
from datamodules import PreferenceDataModule
from datamodules.collate import PairCollator
from datamodules.tokenize import load_tokenizer
from lightning_modules.dpo import DPOModule
from datamodules.utils.errors import UserInputError
from lightning_modules.multiref import Fixed, MultiReferenceModule
from lightning_modules.objectives import MDPO, OBJECTIVES
from lightning_modules.models.loading import load_causal_lm
from datamodules.reference_cache import ReferenceSpec
from lightning_modules.references.cache_builder import compute_for_datamodule
from lightning_modules.references.providers import CachedReference, LiveReference

LN2 = math.log(2.0)
pytestmark = pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")


@pytest.fixture(autouse=True)
def one_thread():  # tiny models gain nothing from threads, and on a busy CPU threads contend badly
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def other_assets(tmp_path_factory) -> Path:  # a second tiny model, its tokenizer with another vocabulary
    from datamodules.synthetic import SyntheticTask, build_assets

    return build_assets(tmp_path_factory.mktemp("other"), task=SyntheticTask(), n_sft=8, n_pref=8, n_val=8,
                        vocab_size=300, model_kwargs=TINY_MODEL)


def copy_prefs(assets: Path, out: Path, n_train: int | None = 24, n_val: int | None = 8) -> Path:
    """The first rows of the assets' train / validation pairs, in a folder of their own."""
    for split, n in (("train", n_train), ("validation", n_val)):
        lines = (assets / "data/prefs" / f"{split}.jsonl").read_text().splitlines(keepends=True)
        (out / "prefs").mkdir(parents=True, exist_ok=True)
        (out / "prefs" / f"{split}.jsonl").write_text("".join(lines[:n]))
    return out / "prefs"


def make_dm(data: Path, assets: Path, specs: list[ReferenceSpec], **kwargs) -> PreferenceDataModule:
    return PreferenceDataModule(str(data), str(assets / "model"), reference_cache=specs,
                                **{"batch_size": 4, "shuffle": False, **kwargs})


def fit(module: DPOModule, dm: PreferenceDataModule, steps: int = 2) -> list[float]:  # the first training losses
    losses: list[float] = []
    record = L.Callback()
    record.on_train_batch_end = lambda trainer, module, outputs, batch, i: losses.append(float(outputs["loss"]))
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[record])
    trainer.fit(module, datamodule=dm)
    return losses


def test_cached_logps_equal_live_reference(assets: Path, tmp_path: Path) -> None:
    dm = make_dm(copy_prefs(assets, tmp_path, None, None), assets, [ReferenceSpec(str(assets / "model"))])
    results = compute_for_datamodule(dm)
    assert [(role, r.computed) for role, r in results] == [("train", True), ("val", True)]
    dm.setup("fit")
    model = load_causal_lm(str(assets / "model"))
    live, live_avg = LiveReference(model), LiveReference(model, average=True)
    for role in ("train", "val"):
        batch = PairCollator(dm.tokenizer.pad_token_id)(dm.data[role])  # the whole split, in file order
        want_c, want_r = live(batch)
        assert batch["ref_chosen_logps"].shape == (len(dm.data[role]), 1)
        torch.testing.assert_close(batch["ref_chosen_logps"][:, 0], want_c, atol=1e-5, rtol=1e-6)  # the cache is scored packed, live padded
        torch.testing.assert_close(batch["ref_rejected_logps"][:, 0], want_r, atol=1e-5, rtol=1e-6)  # the cache is scored packed, live padded
        for side in ("chosen", "rejected"):
            counts = (batch[f"{side}_labels"][:, 1:] != -100).sum(-1)
            assert batch[f"ref_{side}_counts"][:, 0].tolist() == counts.tolist()
        for got, want in zip(CachedReference(average=True)(batch), live_avg(batch)):  # own-count normalization
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_unconditional_is_bos_plus_response(assets: Path, tmp_path: Path) -> None:
    spec = ReferenceSpec(str(assets / "model"), unconditional=True)
    dm = make_dm(copy_prefs(assets, tmp_path, 4, 2), assets, [spec])
    compute_for_datamodule(dm)
    dm.setup("fit")
    pair = json.loads((tmp_path / "prefs/train.jsonl").read_text().splitlines()[0])
    tok, model = load_tokenizer(str(assets / "model")), load_causal_lm(str(assets / "model"))
    ids = [tok.bos_token_id] + tok(pair["chosen"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
    want = sum(logp[t, y].item() for t, y in enumerate(ids[1:]))  # every token after BOS is response
    item = dm.data["train"][0]
    assert item["ref_chosen_logps"][0] == pytest.approx(want, abs=1e-5)
    assert item["ref_chosen_counts"] == [len(ids) - 1]


def test_cached_training_loads_no_reference_and_matches_live(assets: Path, tmp_path: Path, monkeypatch) -> None:
    data = copy_prefs(assets, tmp_path)
    compute_for_datamodule(make_dm(data, assets, [ReferenceSpec(str(assets / "model"))]))
    loads, forwards = [], []
    original_load = transformers.AutoModelForCausalLM.from_pretrained
    original_forward = dpo_lib.concatenated_forward
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda name, **kw: loads.append(str(name)) or original_load(name, **kw))
    monkeypatch.setattr(dpo_lib, "concatenated_forward", lambda model, batch, **kw: forwards.append(model)
                        or original_forward(model, batch, **kw))
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3)
    L.seed_everything(0, verbose=False)
    module = DPOModule(str(assets / "model"), reference="cached", optimizer=optimizer)
    cached = fit(module, make_dm(data, assets, [ReferenceSpec(str(assets / "model"))]))
    assert loads == [str(assets / "model")]  # the policy, once; no reference model
    assert len(forwards) == 2 and all(m is module.policy for m in forwards)  # zero reference passes
    assert isinstance(module.reference, CachedReference) and not list(module.reference.parameters())
    assert module.reference.forward_calls == 0

    L.seed_everything(0, verbose=False)
    live_module = DPOModule(str(assets / "model"), optimizer=optimizer)
    live = fit(live_module, make_dm(data, assets, None))
    assert live_module.reference.forward_calls == 2
    assert live[0] == pytest.approx(LN2, abs=1e-6)
    assert cached[0] == pytest.approx(live[0], abs=1e-5)


def test_reference_with_other_tokenizer(assets: Path, other_assets: Path, tmp_path: Path) -> None:
    dm = make_dm(copy_prefs(assets, tmp_path), assets, [ReferenceSpec(str(other_assets / "model"))])
    compute_for_datamodule(dm)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["ref_chosen_counts"][:, 0].tolist() != (batch["chosen_labels"][:, 1:] != -100).sum(-1).tolist()
    other_tok = load_tokenizer(str(other_assets / "model"))
    first = json.loads((tmp_path / "prefs/train.jsonl").read_text().splitlines()[0])["chosen"]
    assert batch["ref_chosen_counts"][0, 0] == len(other_tok(first, add_special_tokens=False)["input_ids"]) + 1  # + EOS
    losses = fit(DPOModule(str(assets / "model"), reference="cached"), dm, steps=1)
    assert len(losses) == 1 and math.isfinite(losses[0]) and abs(losses[0] - LN2) > 1e-3


def test_two_references_give_bk_columns_and_run_mdpo(assets: Path, other_assets: Path, tmp_path: Path) -> None:
    specs = [ReferenceSpec(str(assets / "model")), ReferenceSpec(str(other_assets / "model"))]
    dm = make_dm(copy_prefs(assets, tmp_path), assets, specs)
    compute_for_datamodule(dm)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    for key in ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_counts", "ref_rejected_counts"):
        assert batch[key].shape == (4, 2), key
    assert batch["ref_chosen_logps"].dtype == torch.float32 and batch["ref_chosen_counts"].dtype == torch.long
    assert batch["ref_chosen_counts"][0].tolist() == dm.data["train"][0]["ref_chosen_counts"]  # (K,) item → (B, K)
    module = MultiReferenceModule(str(assets / "model"), objective=MDPO(), weighting=Fixed([0.25, 0.75]))
    module.configure_model()
    loss, _ = module.model_step(batch, "train")
    pc, pr = LiveReference(load_causal_lm(str(assets / "model")))(batch)  # the policy's log-probs
    want = OBJECTIVES["mdpo"](pc, pr, batch["ref_chosen_logps"], batch["ref_rejected_logps"], beta=0.1,
                              alphas=[0.25, 0.75]).losses.mean()
    assert loss.item() == pytest.approx(want.item(), abs=1e-5)
    assert math.isfinite(fit(module, dm, steps=1)[0])

    with pytest.raises(UserInputError, match=r"takes one reference, but data.reference_cache lists K=2"):
        CachedReference(shape="single")(batch)


@pytest.mark.parametrize(("dpo_weight", "sft_weight"), [(0.5, 2.0), (0.0, 1.0)])
def test_dpo_weight_scales_the_preference_term(assets: Path, dpo_weight: float, sft_weight: float) -> None:
    dm = PreferenceDataModule(str(assets / "data/prefs"), str(assets / "model"), val_split=None)
    dm.setup("fit")
    batch = PairCollator(dm.tokenizer.pad_token_id)(dm.data["train"][:4])
    module = DPOModule(str(assets / "model"), dpo_weight=dpo_weight, sft_weight=sft_weight)
    module.configure_model()
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    (ref_c, ref_r), (pol_c, pol_r) = module.reference(batch), LiveReference(module.policy)(batch)
    pref = -F.logsigmoid(0.1 * ((pol_c - pol_r) - (ref_c - ref_r))).mean()
    nll = (-pol_c / (batch["chosen_labels"][:, 1:] != -100).sum(-1)).mean()  # per-token NLL of the chosen side
    loss, metrics = module.model_step(batch, "train")
    assert loss.item() == pytest.approx(dpo_weight * pref.item() + sft_weight * nll.item(), abs=1e-5)
    assert metrics["pref_loss"].item() == pytest.approx(pref.item(), abs=1e-5)
    assert metrics["sft_nll"].item() == pytest.approx(nll.item(), abs=1e-5)
    with pytest.raises(UserInputError, match="dpo_weight"):
        DPOModule(str(assets / "model"), dpo_weight=0.0, sft_weight=0.0)


def test_second_computation_reuses_the_file(assets: Path, tmp_path: Path, monkeypatch) -> None:
    dm = make_dm(copy_prefs(assets, tmp_path), assets, [ReferenceSpec(str(assets / "model"))])
    first = compute_for_datamodule(dm)
    stamps = [r.path.stat().st_mtime_ns for _, r in first]

    def forbidden(*args, **kwargs):
        raise AssertionError("a reused cache must not run or load the reference")

    monkeypatch.setattr(rc, "concatenated_forward", forbidden)
    monkeypatch.setattr(rc, "load_causal_lm", forbidden)
    second = compute_for_datamodule(dm)
    assert [r.computed for _, r in second] == [False, False]
    assert [r.path.stat().st_mtime_ns for _, r in second] == stamps
    assert all(np.array_equal(a.values.arrays[name], b.values.arrays[name])
               for (_, a), (_, b) in zip(first, second) for name in rc.ARRAYS)


def test_every_key_field_changes_the_file_name(assets: Path) -> None:
    spec, base = ReferenceSpec(str(assets / "model")), {"dataset_fingerprint": "f", "max_length": 64, "cache_dir": "c"}
    variants = [(spec, {}), (ReferenceSpec("org/other"), {}), (spec, {"max_length": 32}),
                (spec, {"dataset_fingerprint": "g"})]
    variants += [(replace(spec, **{field: value}), {}) for field, value in
                 (("template", "plain"), ("insert_eos", True), ("dtype", "bfloat16"), ("unconditional", True))]
    paths = {rc.cache_location(s, **{**base, **kw})[1] for s, kw in variants}
    assert len(paths) == len(variants) and all(p.parent == Path("c") for p in paths)


@pytest.mark.parametrize("change", [{"template": "plain"}, {"unconditional": True}, {"max_length": 12}])
def test_changing_a_key_field_recomputes(assets: Path, tmp_path: Path, change: dict) -> None:
    data = copy_prefs(assets, tmp_path, 8, 2)
    base = compute_for_datamodule(make_dm(data, assets, [ReferenceSpec(str(assets / "model"))]))
    spec = ReferenceSpec(str(assets / "model"), **{k: v for k, v in change.items() if k != "max_length"})
    changed = compute_for_datamodule(make_dm(data, assets, [spec], max_length=change.get("max_length", 512)))
    assert all(r.computed for _, r in changed)
    assert {r.path for _, r in changed}.isdisjoint({r.path for _, r in base})
    assert not np.allclose(base[0][1].values.arrays["chosen_logps"], changed[0][1].values.arrays["chosen_logps"])


def _garbage_with_matching_checksum(npz: Path, manifest: Path) -> None:
    npz.write_bytes(b"not a zip file")
    sha = hashlib.sha256(b"not a zip file").hexdigest()
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "sha256": sha}))


DAMAGE = {  # the warning each damage must raise → how to inflict it on (arrays .npz, manifest .json)
    "checksum mismatch": lambda npz, manifest: npz.write_bytes(npz.read_bytes()[:100]),  # truncated arrays
    "unreadable": _garbage_with_matching_checksum,
    "row count mismatch": lambda npz, manifest: manifest.write_text(
        json.dumps({**json.loads(manifest.read_text()), "rows": 3})),
    "no manifest": lambda npz, manifest: manifest.unlink(),  # an interrupted write
}


@pytest.mark.parametrize("warning", list(DAMAGE))
def test_damaged_cache_is_detected_and_rebuilt(assets: Path, tmp_path: Path, warning: str) -> None:
    dm = make_dm(copy_prefs(assets, tmp_path, 8, None), assets, [ReferenceSpec(str(assets / "model"))], val_split=None)
    [(_, good)] = compute_for_datamodule(dm)
    DAMAGE[warning](good.path, good.path.with_name(good.path.stem + ".json"))
    with pytest.warns(UserWarning, match=warning), pytest.raises(UserInputError, match="python -m lightning_modules"):
        dm.setup("fit")  # training never computes: it says how to
    with pytest.warns(UserWarning, match=warning):
        [(_, rebuilt)] = compute_for_datamodule(dm)
    assert rebuilt.computed and rebuilt.path == good.path
    np.testing.assert_allclose(rebuilt.values.arrays["chosen_logps"], good.values.arrays["chosen_logps"], atol=1e-6)
    dm.setup("fit")  # the rebuilt cache is valid again
    assert len(dm.data["train"][0]["ref_chosen_logps"]) == 1


def test_missing_cache_names_the_reference_and_the_command(assets: Path, tmp_path: Path) -> None:
    dm = make_dm(copy_prefs(assets, tmp_path, 4, 2), assets, [ReferenceSpec(str(assets / "model"))])
    with pytest.raises(UserInputError, match=r"reference_cache\[0\] \('.*model'\) has no valid cached log-probs "
                                             r"for the train split.*python -m lightning_modules.references.cache_builder"):
        dm.setup("fit")
    with pytest.raises(UserInputError, match="set only one"):
        make_dm(tmp_path, assets, [ReferenceSpec("x")], reference_columns=("a", "b"))


def test_cli_computes_then_reuses(assets: Path, tmp_path: Path, capsys) -> None:
    data = copy_prefs(assets, tmp_path, 6, 2)
    specs = [{"name_or_path": str(assets / "model"), "template": "zephyr"}]
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"class_path": "lightning_modules.dpo.DPOModule",
                  "init_args": {"model_name_or_path": str(assets / "model")}},
        "data": {"class_path": "datamodules.PreferenceDataModule",
                 "init_args": {"path": str(data), "max_length": 48, "reference_cache": specs}}}))
    first = rc.main(["--config", str(path), "--batch_size", "4"])
    assert [r.computed for _, r in first] == [True, True] and first[0][1].spec.template == "zephyr"
    assert rc.main(["--config", str(path)])[0][1].computed is False
    override = rc.main(["--config", str(path), "--data.init_args.max_length=32"])
    assert override[0][1].computed is True
    out = capsys.readouterr().out
    assert "train " in out and "computed ->" in out and "reused ->" in out and "rows" in out
    with pytest.raises(SystemExit) as exit_info:
        rc.main(["--config", str(path), "--data.init_args.reference_cache=[]"])
    assert exit_info.value.code == 2

