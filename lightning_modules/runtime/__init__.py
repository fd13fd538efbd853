"""What every training run does to be resumable and safe: RNG state, the non-finite guard, stop signals, run dirs."""

from lightning_modules.runtime.run_dir import RunLogger

__all__ = ["RunLogger"]
