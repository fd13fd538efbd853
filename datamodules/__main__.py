"""`python -m datamodules describe --config CONFIG [--data.init_args.KEY=VALUE ...]` (see `datamodules.describe`)."""

from datamodules.describe import main

if __name__ == "__main__":
    main()
