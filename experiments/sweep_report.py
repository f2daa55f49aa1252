"""Formatting of the sweep tool's results table (`python -m experiments.sweep collect`) as
Markdown and CSV; kept apart so that experiments/sweep.py holds only the grid and the runs."""

import csv
import io

_BPD_COLUMNS = ("final_bpd", "final_bpd_stderr", "best_bpd")


def _cell(column: str, value) -> str:
    if value is None:
        return ""
    if column in _BPD_COLUMNS:
        return f"{value:.4f}"
    if column == "wall_time_s":
        return f"{value:.1f}"
    # Swept values print as Python writes them: 1e-05 must not round to 0.0000.
    return str(value)


def to_markdown(rows: list[dict]) -> str:
    """Formats collect()'s rows as a Markdown table.

    Args:
      rows: dicts from `collect`; columns are taken in first-seen order.

    Returns:
      The table text, bits/dim to four decimals.
    """
    cols = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(c, row.get(c)) for c in cols) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    """Formats collect()'s rows as CSV (full precision, empty cells for None).

    Args:
      rows: dicts from `collect`.

    Returns:
      The CSV text with a header line.
    """
    cols = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
