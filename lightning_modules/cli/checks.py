"""Inputs checked before a subcommand runs: a readable `ckpt_path`."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from datamodules.utils.errors import UserInputError


CKPT_KEYWORDS = ("last", "best", "hpc", "registry")  # resolved by Lightning itself


def check_checkpoint(ckpt_path: str | os.PathLike | None) -> None:
    """`ckpt_path` is a readable checkpoint: exists, and (a zip, as `torch.save` writes) has its central directory.

    Reads the zip directory at the end of the file only, so a truncated file fails here in milliseconds and a
    good one is loaded once, by Lightning. Keywords (`last`, `best`, ...), URLs and DeepSpeed checkpoint folders
    are left to Lightning; a legacy (non-zip) torch file is not inspected.
    """
    if ckpt_path is None:
        return
    text = str(ckpt_path)
    if text in CKPT_KEYWORDS or text.startswith("registry:") or "://" in text:
        return
    path = Path(text).expanduser()
    if path.is_dir():
        return
    if not path.is_file():
        where = "" if path.is_absolute() else f" (looked for {path.resolve()})"
        raise UserInputError(f"ckpt_path={text!r}: no such file{where}; a ModelCheckpoint dirpath holds the "
                             "checkpoints of a run (last.ckpt with save_last: true), or use ckpt_path=last")
    with open(path, "rb") as stream:
        magic = stream.read(4)
    if not magic:
        raise UserInputError(f"ckpt_path={text!r} is empty (0 bytes): the run that wrote it did not finish saving; "
                             "use an earlier checkpoint")
    if magic != b"PK\x03\x04":
        return  # not a zip: a legacy torch.save file, left to torch.load
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise UserInputError(f"ckpt_path={text!r} is truncated or damaged ({error}; {path.stat().st_size} bytes): "
                             "the run that wrote it did not finish saving, or the copy is incomplete; use an earlier "
                             "checkpoint or copy it again") from error
    if not any(name.endswith("data.pkl") for name in names):
        raise UserInputError(f"ckpt_path={text!r} is a zip file but not a torch checkpoint (no data.pkl inside)")


