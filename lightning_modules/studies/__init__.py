"""Studies and benchmarks: every `make` target that writes `runs/<target>/`. Nothing imports them."""
