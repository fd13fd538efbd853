"""The one report every study writes: `summary.json`, `summary.md` (a markdown table) and a PNG.

    fig, (ax,) = new_figure()                      # matplotlib on the Agg backend, one panel
    ax.plot(...)
    write_report("runs/my-study", summary, rows, fig, title="My study", figure_name="my.png")

`write_report` writes the three files atomically (`datamodules.utils.files`), prints the table and
returns their paths. `markdown_table` is the one table renderer: floats get 3 decimals (scientific
notation below 1e-3 or from 1e6 on), `None` shows as `-`, and a column can take its own format.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datamodules.utils.files import write_figure_atomic, write_text_atomic

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# A column format: a format spec (".1%", ".2e"), a template with one `{}` ("{:.1f}×"), or a function.
Format = str | Callable[[Any], str]
# Columns: row keys in table order (header = key), or {row key: header}.
Columns = Sequence[str] | Mapping[str, str]


@dataclass(frozen=True)
class ReportPaths:
    """Where `write_report` put the report."""

    json: Path
    markdown: Path
    figure: Path


def format_value(value: Any, fmt: Format | None = None) -> str:
    """One table cell. Without `fmt`: floats as `0.523` (or `1.23e-05` / `4.56e+07`), None as `-`, else `str`."""
    if value is None:
        return "-"
    if callable(fmt):
        return fmt(value)
    if fmt is not None:
        return fmt.format(value) if "{" in fmt else format(value, fmt)
    if isinstance(value, float) and math.isfinite(value) and value != 0 and not 1e-3 <= abs(value) < 1e6:
        return f"{value:.2e}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Columns | None = None,
                   formats: Mapping[str, Format] | None = None) -> str:
    """A GitHub markdown table, one line per row (no trailing newline).

    Args:
        rows: same-keyed dicts; a key missing from a row shows as `-`.
        columns: which keys, in order, and optionally their headers; default: every key of the first row.
        formats: {row key: format} for columns that need other than the default number format.
    """
    if not rows:
        raise ValueError("markdown_table needs at least one row")
    headers = dict(columns) if isinstance(columns, Mapping) else {k: k for k in (columns or rows[0])}
    formats = formats or {}
    lines = ["| " + " | ".join(headers.values()) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(format_value(row.get(key), formats.get(key)) for key in headers) + " |"
              for row in rows]
    return "\n".join(lines)


def new_figure(ncols: int = 1, nrows: int = 1, *, panel_size: tuple[float, float] = (5.0, 3.8),
               title: str | None = None) -> tuple[Figure, list[Axes]]:
    """A matplotlib figure on the Agg backend (no display needed) and its panels, as a flat list."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows), squeeze=False)
    if title:
        fig.suptitle(title)
    return fig, list(axes.flat)


def write_report(out_dir: str | Path, summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                 figure: Figure, *, title: str, intro: str = "", figure_name: str = "summary.png",
                 columns: Columns | None = None, formats: Mapping[str, Format] | None = None, dpi: int = 110,
                 also_wrote: Sequence[Path] = ()) -> ReportPaths:
    """Write `summary.json`, `summary.md` and `figure_name` into `out_dir`, print the table, return the paths.

    Args:
        out_dir: the study's output folder (created when missing).
        summary: everything a later reader needs (settings and results), written as indented JSON.
        rows: the table's rows (see `markdown_table`).
        figure: a matplotlib figure (see `new_figure`); it is laid out, saved and closed.
        title: first line (`# title`) of summary.md.
        intro: paragraph between the title and the table (how the numbers were made).
        figure_name: file name of the PNG.
        columns, formats: passed to `markdown_table`.
        dpi: PNG resolution.
        also_wrote: other files the study wrote, named in the closing `wrote ...` line.
    """
    out = Path(out_dir)
    table = markdown_table(rows, columns, formats)
    head = f"# {title}\n\n" + (f"{intro.strip()}\n\n" if intro.strip() else "")
    paths = ReportPaths(json=write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n"),
                        markdown=write_text_atomic(out / "summary.md", f"{head}{table}\n"),
                        figure=out / figure_name)
    figure.tight_layout()
    write_figure_atomic(figure, paths.figure, dpi=dpi)
    print(table)
    print("\nwrote " + ", ".join(str(p) for p in (paths.json, paths.markdown, paths.figure, *also_wrote)))
    return paths
