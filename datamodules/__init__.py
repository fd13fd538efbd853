"""DataModules: SFT and preference data through HF `datasets`, plus the synthetic task.

The data-module classes are imported on first use (PEP 562), so `datamodules.utils` and
`datamodules.synthetic.task` stay light to import.
"""

from importlib import import_module
from typing import Any

_CLASSES = {
    "PreferenceDataModule": "datamodules.preference",
    "PromptDataModule": "datamodules.prompts",
    "SFTDataModule": "datamodules.sft",
    "TextDataModule": "datamodules.text_data",
}


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        return getattr(import_module(_CLASSES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_CLASSES)
