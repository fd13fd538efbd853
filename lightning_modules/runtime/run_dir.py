"""Versioned run directories: every CLI run writes into its own folder, and `latest` points at the newest.

    <root>/version_0/            the first run: TensorBoard events, config.yaml, hparams.yaml,
                                 checkpoints/ (ModelCheckpoint's default), export/, metrics.json
    <root>/version_1/            the next run of the same config: nothing of version_0 is touched
    <root>/latest -> version_1   the newest *fit* run, replaced atomically when it starts
                                 (validate / test / predict runs get a version folder too, but
                                 `latest` keeps naming the newest trained policy)

`RunLogger` is a TensorBoard logger whose version folder is claimed with an atomic `mkdir`, so two
runs started at once never share one. Under DDP the launching process claims it and the ranks it
spawns inherit it (`PREFOPT_RUN_DIR`). Callbacks write relative paths into the run directory
(`resolve_in_run_dir`), so a config says `export` and gets `<root>/version_N/export`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger

ENV = "PREFOPT_RUN_DIR"  # the claimed run directory, inherited by the ranks a DDP launch spawns
LATEST = "latest"


def claim_version_dir(root: str | os.PathLike) -> Path:
    """Create and return `root/version_N` for the smallest N above every existing one, atomically."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name.split("_", 1)[1]) for p in root.iterdir()
             if p.name.startswith("version_") and p.name.split("_", 1)[1].isdigit()]
    n = max(taken, default=-1) + 1
    while True:
        try:
            (root / f"version_{n}").mkdir()
            return root / f"version_{n}"
        except FileExistsError:  # another run claimed it between the listing and the mkdir
            n += 1


def point_latest(run_dir: Path) -> None:
    """Make `run_dir.parent/latest` a relative symlink to `run_dir`, replacing any previous one atomically."""
    link = run_dir.parent / LATEST
    tmp = run_dir.parent / f".{LATEST}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name, target_is_directory=True)
    os.replace(tmp, link)


def _spawned_rank() -> bool:
    """True in a DDP rank started by a launcher (not the launching process itself)."""
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


class RunLogger(TensorBoardLogger):
    """TensorBoard logging into a fresh `root/version_N/` per run (never reused), with `root/latest` -> it."""

    def __init__(self, root_dir: str, **kwargs: Any):
        """Run directory.

        Args:
            root_dir: the job's folder (e.g. runs/demo/dpo); each run gets root_dir/version_N, root_dir/latest points at it.
            **kwargs: other `TensorBoardLogger` options (log_graph, default_hp_metric, prefix).
        """
        inherited = os.environ.get(ENV)
        if inherited and _spawned_rank() and Path(inherited).parent == Path(root_dir):
            run_dir = Path(inherited)
        else:
            run_dir = claim_version_dir(root_dir)
            os.environ[ENV] = str(run_dir)
        kwargs.setdefault("default_hp_metric", False)  # no placeholder `hp_metric` scalar
        super().__init__(save_dir=root_dir, name="", version=run_dir.name, **kwargs)
        self.run_dir = run_dir


def mark_latest(trainer: Any) -> None:
    """At the start of `fit` (rank 0): point `<root>/latest` at this run's directory, if it has one."""
    logger = getattr(trainer, "logger", None)
    if isinstance(logger, RunLogger) and trainer.is_global_zero:
        point_latest(logger.run_dir)


def run_dir_of(trainer: Any) -> Path:
    """The run directory: the logger's folder, else `default_root_dir`.

    Not `trainer.log_dir`, which is a collective (a broadcast from rank 0) under DDP and would hang when
    only rank 0 asks, as a callback writing a file does.
    """
    logger = getattr(trainer, "logger", None)
    folder = getattr(logger, "log_dir", None) if logger is not None else None
    return Path(folder or getattr(trainer, "default_root_dir", None) or ".")


def resolve_in_run_dir(path: str | os.PathLike, trainer: Any) -> Path:
    """An absolute path as is; a relative one inside the run directory (`run_dir_of`)."""
    path = Path(path)
    return path if path.is_absolute() else run_dir_of(trainer) / path
