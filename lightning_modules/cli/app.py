"""The one CLI (`lightning_modules.cli`): `python -m lightning_modules fit|validate|test|predict --config configs/....yaml`.

A `LightningCLI` whose model and data are chosen by `class_path` (any `LightningModule` /
`LightningDataModule`: the LLM modules (`PolicyModule`, `TextDataModule` subclasses) and the bandit's
`BanditModule` / `BanditDataModule`), parsed in jsonargparse's `omegaconf+` mode so `${...}` interpolations
resolve after command-line overrides. The tokenizer path is linked from the model path, never
repeated (jsonargparse applies the link only when both chosen classes have those parameters). Bad
config keys or types exit with status 2 and one paragraph that leads with the key and value
(`lead_with_key`); a `UserInputError` raised while building or running exits with status 2 and its
message, no traceback. Before a subcommand runs, its inputs are checked (`PrefOptCLI.check_inputs`):
`ckpt_path` (exists, not truncated) and the model / reference / tokenizer paths (exist, or a hub id that
can be had). Known third-party noise (one DeepSpeed line, Lightning's tips, a bitsandbytes kernel hint,
a Lightning-internal deprecation) is filtered narrowly (`quiet_known_noise`).
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
import zipfile
from pathlib import Path

import lightning as L
import torch
import yaml
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from datamodules.tokenize import check_pretrained_source
from datamodules.utils.errors import exit_on_user_error
from lightning_modules.cli.checks import check_checkpoint
from lightning_modules.cli.messages import ConciseParser
from lightning_modules.cli.noise import quiet_known_noise
from lightning_modules.models.loading import check_local_weights


class PrefOptCLI(LightningCLI):
    """LightningCLI with the shared-value links of this codebase, and its inputs checked before running."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.tokenizer_name_or_path")

    def check_inputs(self) -> None:
        """Fail in one paragraph, before anything loads, on a bad `ckpt_path` or model / reference / tokenizer path."""
        # also checked at parse time (`_parse_ckpt_path`); here too in case Lightning stops calling that private hook
        check_checkpoint(self.config_init[self.subcommand].get("ckpt_path"))
        model_path = getattr(self.model, "model_name_or_path", None)
        sources = [("model.model_name_or_path", model_path)]
        if getattr(self.model, "reference_mode", "live") == "live":
            sources.append(("model.reference_name_or_path", getattr(self.model, "reference_name_or_path", None)))
        tokenizer_path = getattr(self.datamodule, "tokenizer_name_or_path", None)
        if tokenizer_path != model_path:  # linked from the model path unless set
            sources.append(("data.tokenizer_name_or_path", tokenizer_path))
        for key, value in sources:
            if isinstance(value, str):
                check_pretrained_source(value, key)
                check_local_weights(value, key)

    def _parse_ckpt_path(self) -> None:
        """Lightning's read of the checkpoint's hyperparameters, after `check_checkpoint`, memory-mapped.

        Lightning reads the whole checkpoint here (for hyperparameters this codebase does not save) and again when
        it restores; memory-mapped, this first read touches only the pickled structure, not the tensor bytes.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        check_checkpoint(ckpt_path)
        if ckpt_path and Path(ckpt_path).is_file() and zipfile.is_zipfile(ckpt_path):
            load = torch.load  # Lightning calls `torch.load` by module attribute: swapped for this one call
            torch.load = functools.partial(load, mmap=True)
            try:
                return super()._parse_ckpt_path()
            finally:
                torch.load = load
        return super()._parse_ckpt_path()

    def log_resolved_config(self) -> None:
        """The resolved config (every key, after overrides) as the run's hyperparameters (hparams.yaml, TensorBoard)."""
        logger = self.trainer.logger
        if logger is None:
            return
        text = self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False, skip_check=True)
        logger.log_hyperparams(yaml.safe_load(text))

    def before_fit(self) -> None:
        self.check_inputs()
        self.log_resolved_config()

    before_validate = before_test = before_predict = before_fit


def die_with_launcher() -> None:
    """In a rank that Lightning's launcher spawned (LOCAL_RANK > 0, Linux): get SIGTERM when the launcher dies.

    Without this, a rank-0 crash before the process group is up leaves rank 1 waiting out the rendezvous
    timeout (30 minutes) instead of ending with it.
    """
    if os.environ.get("LOCAL_RANK", "0") == "0" or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not glibc/musl: keep going without it
        pass


def main(args: list[str] | None = None, run: bool = True) -> PrefOptCLI:
    """Build (and by default run) the CLI; `args=None` reads `sys.argv`."""
    die_with_launcher()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_known_noise()  # again: a caller (tests) may have reset the warning filters
    # `${data.init_args.batch_size}` in a config file means that file's own keys, not `fit.data...`.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    with exit_on_user_error():
        return PrefOptCLI(
            model_class=L.LightningModule,  # PolicyModule subclasses (LLMs) and BanditModule
            datamodule_class=L.LightningDataModule,  # TextDataModule subclasses and BanditDataModule
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,  # modules own their injected optimizer + schedule
            parser_kwargs={"parser_mode": "omegaconf+"},
            parser_class=ConciseParser,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )
