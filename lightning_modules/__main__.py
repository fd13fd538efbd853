"""`python -m lightning_modules fit --config configs/quickstart/sft.yaml` (see `lightning_modules.cli`)."""

from lightning_modules.cli import main

if __name__ == "__main__":
    main()
