"""The one CLI: `python -m lightning_modules fit|validate|test|predict --config configs/....yaml`.

- `app.py`: `PrefOptCLI` (a `LightningCLI`) and `main`.
- `messages.py`: config errors as one paragraph that leads with the key and value.
- `checks.py`: inputs checked before a subcommand runs (`ckpt_path`).
- `noise.py`: known third-party console noise, filtered narrowly.
"""

from lightning_modules.cli.noise import quiet_known_noise

quiet_known_noise()  # before the imports below: bitsandbytes logs its line at import time (peft imports it)

from lightning_modules.cli.app import PrefOptCLI, main  # noqa: E402
from lightning_modules.cli.checks import check_checkpoint  # noqa: E402
from lightning_modules.cli.messages import ConciseParser, concise, lead_with_key  # noqa: E402

__all__ = ["ConciseParser", "PrefOptCLI", "check_checkpoint", "concise", "lead_with_key", "main", "quiet_known_noise"]
