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

from jsonargparse import set_parsing_settings
from jsonargparse._common import debug_mode_active
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from datamodules.text_data import TextDataModule
from datamodules.utils.errors import USER_ERROR_EXIT_CODE, exit_on_user_error
from lightning_modules.policy import PolicyModule


NOISE = ("Given value type:", "Given value:", "- Expected a <class 'NoneType'>")


def concise(message: str) -> str:
    """jsonargparse's nested error text as one paragraph, keeping every line that names a key or value."""
    lines = [line.strip() for line in message.splitlines()]
    return " ".join(line for line in lines if line and not line.startswith(NOISE))


class ConciseParser(LightningArgumentParser):
    """Config errors as one paragraph naming the key (no 50-line usage dump); JSONARGPARSE_DEBUG=1 for all."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or debug_mode_active():
            return super().error(message, ex)
        sys.stderr.write(f"error: {concise(message)}\n(run with --help for every option and its description)\n")
        self.exit(USER_ERROR_EXIT_CODE)


class PrefOptCLI(LightningCLI):
    """LightningCLI with the shared-value links of this codebase."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.tokenizer_name_or_path")


def main(args: list[str] | None = None, run: bool = True) -> PrefOptCLI:
    """Build (and by default run) the CLI; `args=None` reads `sys.argv`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # `${data.init_args.batch_size}` in a config file means that file's own keys, not `fit.data...`.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    with exit_on_user_error():
        return PrefOptCLI(
            model_class=PolicyModule,
            datamodule_class=TextDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,  # modules own their injected optimizer + schedule
            parser_kwargs={"parser_mode": "omegaconf+"},
            parser_class=ConciseParser,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )
