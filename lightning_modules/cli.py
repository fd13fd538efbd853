"""The one CLI: `python -m lightning_modules fit|validate|test|predict --config configs/....yaml`.

A `LightningCLI` whose model and data are chosen by `class_path` (any `PolicyModule` /
`TextDataModule` subclass), parsed in jsonargparse's `omegaconf+` mode so `${...}` interpolations
resolve after command-line overrides. The tokenizer path is linked from the model path, never
repeated. Bad config keys or types exit with status 2 and a message naming the key; a
`UserInputError` raised while building or running exits with status 2 and its message, no traceback.
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

from datamodules.text_data import TextDataModule
from lightning_modules.errors import UserInputError
from lightning_modules.policy import PolicyModule


class PrefOptCLI(LightningCLI):
    """LightningCLI with the shared-value links of this codebase."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.tokenizer_name_or_path")


def main(args: list[str] | None = None, run: bool = True) -> PrefOptCLI:
    """Build (and by default run) the CLI; `args=None` reads `sys.argv`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return PrefOptCLI(
            model_class=PolicyModule,
            datamodule_class=TextDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,  # modules own their injected optimizer + schedule
            parser_kwargs={"parser_mode": "omegaconf+"},
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
