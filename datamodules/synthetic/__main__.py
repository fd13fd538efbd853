"""Command line for the embedded default's assets.

    python -m datamodules.synthetic build --out DIR [--variant aligned|unaligned] [--seed 0]
        [--n-sft N] [--n-pref N] [--label-noise F] [--force]
    python -m datamodules.synthetic show --out DIR
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

from datamodules.synthetic.task import VARIANTS, SyntheticTask


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.synthetic",
        description="Build or inspect the offline synthetic task assets (tokenizer, tiny Llama, JSONL data).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or reuse, if the manifest matches) the assets in --out",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    build.add_argument("--out", type=Path, required=True, help="output directory")
    build.add_argument("--variant", choices=VARIANTS, default="aligned",
                       help="reward that labels the preference pairs: word match or min length")  # fmt: skip
    build.add_argument("--seed", type=int, default=0, help="seed of the sampled rows")
    build.add_argument("--n-sft", type=int, default=4000, help="SFT demonstrations in the train split")
    build.add_argument("--n-pref", type=int, default=4000, help="preference pairs in the train split")
    build.add_argument("--n-val", type=int, default=256, help="rows in each validation file")
    build.add_argument("--label-noise", type=float, default=0.1,
                       help="probability of flipping a pair's label")  # fmt: skip
    build.add_argument("--force", action="store_true", help="rebuild even if the cached assets match")
    show = sub.add_parser("show", help="print a few rows and the demonstrator's mode reward vs the optimum")
    show.add_argument("--out", type=Path, required=True, help="directory written by `build`")
    show.add_argument("--rows", type=int, default=3, help="rows to print per file")
    return parser


def _head(path: Path, n: int) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


def show(out: Path, n_rows: int = 3) -> None:
    """Print sample rows and, on the test prompts, the mean reward of the mode and of the optimum."""
    params = json.loads((out / "manifest.json").read_text())["params"]
    task = SyntheticTask(**params["task"])
    print(f"task: {task}")
    for rel in ("data/sft/train.jsonl", "data/prefs/train.jsonl", "data/prompts/test.jsonl"):
        print(f"--- {rel}")
        for row in _head(out / rel, n_rows):
            print(json.dumps(row))
    prompts = task.prompts("test")
    mode = mean(task.reward(p, task.mode(p)) for p in prompts)
    best = mean(task.reward(p, task.optimum(p)) for p in prompts)
    print(f"--- reward ({task.variant}) on {len(prompts)} test prompts")
    print(f"demonstrator mode (target + ' hope this helps'): {mode:.3f}")
    print(f"optimum ({'target' if task.variant == 'aligned' else 'empty response'}): {best:.3f}")


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` and run the chosen command."""
    args = _parser().parse_args(argv)
    if args.command == "build":
        from datamodules.synthetic.assets import build_assets  # imports torch + transformers

        task = SyntheticTask(variant=args.variant, seed=args.seed)
        build_assets(args.out, task=task, n_sft=args.n_sft, n_pref=args.n_pref, n_val=args.n_val,
                     label_noise=args.label_noise, force=args.force)  # fmt: skip
    else:
        show(args.out, args.rows)


if __name__ == "__main__":
    main()
