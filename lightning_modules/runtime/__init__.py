"""What every training run does to be resumable and safe: RNG state, the non-finite guard, stop signals, run dirs."""
