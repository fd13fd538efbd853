"""DataModules: SFT and preference data through HF `datasets`, plus the synthetic task."""

from datamodules.preference import PreferenceDataModule
from datamodules.prompts import PromptDataModule
from datamodules.sft import SFTDataModule
from datamodules.text_data import TextDataModule

__all__ = ["PreferenceDataModule", "PromptDataModule", "SFTDataModule", "TextDataModule"]
