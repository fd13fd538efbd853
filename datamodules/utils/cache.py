"""Checksummed caches: a payload and a manifest that says what it was built from and what it hashes to.

One protocol for every cache of the project (reference log-probs, study splits, synthetic assets):

- write: remove the old manifest, write the payload, then the manifest last, each atomically
  (`datamodules.utils.files`), so an interrupted write leaves a payload without a manifest,
  which reads as invalid, never a manifest describing a half-written payload;
- read: the manifest must hold the `expected` entries (format tag, key parameters), and the
  payload's sha256 must be the manifest's. Anything else returns None with a warning that names
  the problem; a cache that was never written returns None silently.

Three shapes share it:

    write_checksummed / read_checksummed            one payload file + a JSON manifest beside it
    write_checksummed_json / read_checksummed_json  one JSON document holding both
    write_files_manifest / files_manifest_problem   a folder of files + a manifest of their sha256

Worked example (a reference log-prob cache; `tmp` a folder)::

    expected = {"format": "prefopt.reference_logps/1", "params": {"max_length": 512}}
    write_checksummed(tmp / "m.npz", b"<npz bytes>", tmp / "m.json", {**expected, "rows": 3})
    read_checksummed(tmp / "m.npz", tmp / "m.json", expected=expected)
        -> Checked(payload=b"<npz bytes>", manifest={..., "rows": 3, "sha256": "9f2c..."})
    read_checksummed(tmp / "m.npz", tmp / "m.json", expected={**expected, "params": {"max_length": 64}})
        -> None, warning "cache .../m.json is invalid (stale: its 'params' differ from the expected
           ones); treating it as missing"
    (tmp / "m.npz").write_bytes(b"<other bytes>"); read_checksummed(...)
        -> None, warning "... (checksum mismatch: m.npz is not the file the manifest describes) ..."
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datamodules.utils.files import write_bytes_atomic, write_text_atomic

PathLike = str | os.PathLike


@dataclass(frozen=True)
class Checked:
    """A payload whose manifest matched and whose sha256 checked out."""

    payload: bytes
    manifest: dict[str, Any]


# ---- hashing and keys --------------------------------------------------------------------------------


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    return sha256_hex(Path(path).read_bytes())


def canonical_json(obj: Any, *, compact: bool = True) -> str:
    """`obj` as JSON with sorted keys (`compact`: no spaces after `,` and `:`), the text every checksum hashes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":") if compact else None)


def params_key(params: Mapping[str, Any], *, digits: int = 16, compact: bool = True) -> str:
    """The first `digits` hex digits of the sha256 of `canonical_json(params)`: a cache file's name."""
    return sha256_hex(canonical_json(params, compact=compact).encode())[:digits]


def local_folder_id(name_or_path: str, entry: Callable[[Path], bytes | None], *, digits: int = 16) -> str:
    """A hub id as is; a local folder as `<resolved path>#<digest>` over `entry(file)` of its files, by name.

    `entry` gives the bytes a file enters the digest with (None: the file does not count).
    """
    folder = Path(name_or_path)
    if not folder.is_dir():
        return name_or_path
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        chunk = entry(file) if file.is_file() else None
        if chunk is not None:
            digest.update(chunk)
    return f"{folder.resolve()}#{digest.hexdigest()[:digits]}"


# ---- manifests ---------------------------------------------------------------------------------------


def warn_invalid(path: PathLike, problem: str, *, what: str = "cache", stacklevel: int = 3) -> None:
    """The one warning of an invalid cache: `{what} {path} is invalid ({problem}); treating it as missing`."""
    warnings.warn(f"{what} {path} is invalid ({problem}); treating it as missing", stacklevel=stacklevel)


def stale_problem(document: Mapping[str, Any], expected: Mapping[str, Any]) -> str | None:
    """Which `expected` entries `document` lacks or holds otherwise (compared as JSON), or None."""
    wanted = json.loads(json.dumps(dict(expected)))  # tuples → lists, as they come back from a file
    differ = [key for key, value in wanted.items() if document.get(key) != value]
    return f"stale: its {', '.join(map(repr, differ))} differ from the expected ones" if differ else None


def _load_json_object(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the JSON object in `path`, None) or (None, why it is unreadable)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return None, f"unreadable ({type(error).__name__}: {error})"
    if not isinstance(document, dict):
        return None, f"unreadable (a JSON {type(document).__name__}, not an object)"
    return document, None


def invalidate(manifest_path: PathLike) -> None:
    """Remove a manifest before rewriting what it describes (step one of every write)."""
    Path(manifest_path).unlink(missing_ok=True)


# ---- a payload file and its manifest -----------------------------------------------------------------


def write_checksummed(payload_path: PathLike, payload: bytes, manifest_path: PathLike,
                      manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Remove the old manifest, write `payload`, then `manifest` + its `sha256`, each atomically; returns it."""
    invalidate(manifest_path)
    write_bytes_atomic(payload_path, payload)
    written = {**manifest, "sha256": sha256_hex(payload)}
    write_text_atomic(manifest_path, json.dumps(written, indent=2, sort_keys=True) + "\n")
    return written


def read_checksummed(payload_path: PathLike, manifest_path: PathLike, *, expected: Mapping[str, Any],
                     what: str = "cache") -> Checked | None:
    """The payload and manifest of a valid cache, else None.

    None silently when neither file exists; with a warning (see `warn_invalid`) for a payload
    without a manifest (an interrupted write), an unreadable manifest, a manifest whose `expected`
    entries differ (stale), a missing payload, or a payload whose sha256 is not the manifest's.
    """
    payload_path, manifest_path = Path(payload_path), Path(manifest_path)
    if not manifest_path.exists():
        if payload_path.exists():
            warn_invalid(payload_path, "no manifest: an interrupted write?", what=what)
        return None
    manifest, problem = _load_json_object(manifest_path)
    payload = None
    if manifest is not None:
        problem = stale_problem(manifest, expected)
    if problem is None:
        payload, problem = _read_verified(payload_path, manifest.get("sha256"))
    if problem is not None:
        warn_invalid(manifest_path, problem, what=what)
        return None
    return Checked(payload, manifest)


def _read_verified(path: Path, sha256: Any) -> tuple[bytes | None, str | None]:
    """(the bytes of `path`, None) when their hex digest is `sha256`, else (None, the problem)."""
    if not path.is_file():
        return None, f"its payload {path.name} is missing"
    try:
        data = path.read_bytes()
    except OSError as error:
        return None, f"unreadable ({type(error).__name__}: {error})"
    if sha256_hex(data) != sha256:
        return None, f"checksum mismatch: {path.name} is not the file the manifest describes"
    return data, None


# ---- one JSON document holding params, payload and checksum ------------------------------------------


def _document_checksum(document: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of every entry of `document` but `checksum`."""
    return sha256_hex(canonical_json({k: v for k, v in document.items() if k != "checksum"}).encode())


def write_checksummed_json(path: PathLike, payload: Any, *, expected: Mapping[str, Any]) -> None:
    """Write `{**expected, "payload": payload, "checksum": ...}` atomically as one JSON document."""
    document = {**expected, "payload": payload}
    document["checksum"] = _document_checksum(document)
    write_text_atomic(path, json.dumps(document, sort_keys=True) + "\n")


def read_checksummed_json(path: PathLike, *, expected: Mapping[str, Any], what: str = "cache") -> Any | None:
    """The payload of a valid `write_checksummed_json` document, else None (warning unless absent)."""
    path = Path(path)
    if not path.exists():
        return None
    document, problem = _load_json_object(path)
    if document is not None:
        problem = stale_problem(document, expected) or (
            "checksum mismatch: the document was edited or damaged"
            if document.get("checksum") != _document_checksum(document) else None)
    if problem is not None:
        warn_invalid(path, problem, what=what)
        return None
    return document["payload"]


# ---- a folder of files and a manifest of their checksums ---------------------------------------------


def write_files_manifest(manifest_path: PathLike, root: PathLike, files: Iterable[str],
                         manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Write `manifest` + `files`: {path relative to `root`: sha256} atomically, after the files; returns it."""
    written = {**manifest, "files": {rel: file_sha256(Path(root) / rel) for rel in files}}
    write_text_atomic(manifest_path, json.dumps(written, indent=2) + "\n")
    return written


def files_manifest_problem(manifest_path: PathLike, root: PathLike, *, expected: Mapping[str, Any]) -> str | None:
    """None when the manifest holds `expected` and lists files that all match their sha256; else the problem."""
    manifest_path = Path(manifest_path)
    if not manifest_path.exists():
        return "no manifest"
    manifest, problem = _load_json_object(manifest_path)
    if problem is not None:
        return problem
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return stale_problem(manifest, expected) or "the manifest lists no files"
    problems = (_read_verified(Path(root) / rel, digest)[1] for rel, digest in files.items())
    return stale_problem(manifest, expected) or next((p for p in problems if p is not None), None)
