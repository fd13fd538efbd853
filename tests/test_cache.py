"""The checksummed-cache helper: round trips, and every way a cache goes bad reads as None with a warning."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from datamodules.utils.cache import (files_manifest_problem, local_folder_id, params_key, read_checksummed,
                                     read_checksummed_json, write_checksummed, write_checksummed_json,
                                     write_files_manifest)

EXPECTED = {"format": "test.cache/1", "params": {"n": 3, "sizes": (1, 2)}}
PAYLOAD = bytes(range(256)) * 4


@pytest.fixture
def cache(tmp_path: Path) -> tuple[Path, Path]:
    """A valid payload + manifest pair."""
    payload, manifest = tmp_path / "c.bin", tmp_path / "c.json"
    write_checksummed(payload, PAYLOAD, manifest, {**EXPECTED, "rows": 7})
    return payload, manifest


def read(cache: tuple[Path, Path], expected: dict = EXPECTED):
    return read_checksummed(*cache, expected=expected, what="test cache")


def no_warning(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


# ---- payload + manifest --------------------------------------------------------------------------


def test_round_trip(cache) -> None:
    checked = no_warning(read, cache)
    assert checked.payload == PAYLOAD
    assert checked.manifest["rows"] == 7 and checked.manifest["params"] == {"n": 3, "sizes": [1, 2]}
    assert len(checked.manifest["sha256"]) == 64
    assert not list(cache[0].parent.glob("*.tmp"))


def test_never_written_is_none_without_warning(tmp_path: Path) -> None:
    assert no_warning(read, (tmp_path / "x.bin", tmp_path / "x.json")) is None


def test_corrupt_byte_is_a_checksum_mismatch(cache) -> None:
    data = bytearray(cache[0].read_bytes())
    data[100] ^= 1
    cache[0].write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"test cache .*c\.json is invalid \(checksum mismatch.*treating it as missing"):
        assert read(cache) is None


def test_stale_params_are_rejected(cache) -> None:
    with pytest.warns(UserWarning, match=r"stale: its 'params' differ"):
        assert read(cache, {**EXPECTED, "params": {"n": 4, "sizes": (1, 2)}}) is None
    with pytest.warns(UserWarning, match=r"stale: its 'format' differ"):
        assert read(cache, {**EXPECTED, "format": "test.cache/2"}) is None


def test_interrupted_write_is_payload_without_manifest(cache) -> None:
    cache[1].unlink()  # the payload landed, the manifest never did
    with pytest.warns(UserWarning, match=r"c\.bin is invalid \(no manifest"):
        assert read(cache) is None


def test_rewrite_removes_the_old_manifest_first(cache, monkeypatch) -> None:
    import datamodules.utils.cache as cache_module

    def crash(path, data):
        raise KeyboardInterrupt  # killed while writing the new payload

    monkeypatch.setattr(cache_module, "write_bytes_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        write_checksummed(cache[0], b"new", cache[1], EXPECTED)
    assert not cache[1].exists()  # the old manifest cannot vouch for whatever the payload is now
    with pytest.warns(UserWarning, match="no manifest"):
        assert read(cache) is None


def test_missing_payload_and_unreadable_manifest(cache) -> None:
    cache[0].unlink()
    with pytest.warns(UserWarning, match=r"payload c\.bin is missing"):
        assert read(cache) is None
    cache[1].write_text('{"format": ')
    with pytest.warns(UserWarning, match=r"unreadable \(JSONDecodeError"):
        assert read(cache) is None
    cache[1].write_text("[1, 2]")
    with pytest.warns(UserWarning, match=r"unreadable \(a JSON list"):
        assert read(cache) is None


# ---- one JSON document ---------------------------------------------------------------------------


def test_json_document_round_trip_and_damage(tmp_path: Path) -> None:
    path = tmp_path / "split.json"
    write_checksummed_json(path, {"train": [3, 1, 2]}, expected=EXPECTED)
    assert set(json.loads(path.read_text())) == {"format", "params", "payload", "checksum"}
    assert no_warning(read_checksummed_json, path, expected=EXPECTED) == {"train": [3, 1, 2]}
    assert no_warning(read_checksummed_json, tmp_path / "absent.json", expected=EXPECTED) is None

    with pytest.warns(UserWarning, match="stale"):
        assert read_checksummed_json(path, expected={**EXPECTED, "params": {"n": 5}}) is None
    doc = json.loads(path.read_text())
    doc["payload"]["train"][0] = 9  # a hand edit: still valid JSON
    path.write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match="checksum mismatch"):
        assert read_checksummed_json(path, expected=EXPECTED) is None
    path.write_text(path.read_text()[:20])
    with pytest.warns(UserWarning, match="unreadable"):
        assert read_checksummed_json(path, expected=EXPECTED) is None


# ---- a folder of files ---------------------------------------------------------------------------


def test_files_manifest(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data/a.jsonl").write_text("{}\n")
    (tmp_path / "b.txt").write_text("b")
    manifest = tmp_path / "manifest.json"
    assert files_manifest_problem(manifest, tmp_path, expected={"params": {"k": 1}}) == "no manifest"
    write_files_manifest(manifest, tmp_path, ["data/a.jsonl", "b.txt"], {"params": {"k": 1}, "n_params": 5})
    assert list(json.loads(manifest.read_text())) == ["params", "n_params", "files"]
    assert files_manifest_problem(manifest, tmp_path, expected={"params": {"k": 1}}) is None
    assert "stale" in files_manifest_problem(manifest, tmp_path, expected={"params": {"k": 2}})
    (tmp_path / "b.txt").write_text("B")
    assert files_manifest_problem(manifest, tmp_path, expected={"params": {"k": 1}}).startswith("checksum mismatch")
    (tmp_path / "b.txt").unlink()
    assert "b.txt is missing" in files_manifest_problem(manifest, tmp_path, expected={"params": {"k": 1}})
    write_files_manifest(manifest, tmp_path, [], {"params": {"k": 1}})
    assert files_manifest_problem(manifest, tmp_path, expected={"params": {"k": 1}}) == "the manifest lists no files"


# ---- keys ----------------------------------------------------------------------------------------


def test_keys_and_folder_ids(tmp_path: Path) -> None:
    assert params_key({"b": 1, "a": [1, 2]}) == params_key({"a": (1, 2), "b": 1})  # canonical: order, tuples
    assert len(params_key({"a": 1})) == 16 and params_key({"a": 1}) != params_key({"a": 1}, compact=False)
    assert local_folder_id("org/model", lambda f: f.read_bytes()) == "org/model"  # not a folder: as is
    (tmp_path / "x").write_text("1")
    (tmp_path / "skip").write_text("1")
    entry = lambda f: None if f.name == "skip" else f.read_bytes()  # noqa: E731
    before = local_folder_id(str(tmp_path), entry, digits=12)
    assert before.startswith(f"{tmp_path.resolve()}#") and len(before.split("#")[1]) == 12
    (tmp_path / "skip").write_text("2")
    assert local_folder_id(str(tmp_path), entry, digits=12) == before  # a file that does not count
    (tmp_path / "x").write_text("2")
    assert local_folder_id(str(tmp_path), entry, digits=12) != before
