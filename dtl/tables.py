"""Markdown tables and PNG bytes shared by the report and its sections (fuzzy, explain)."""

from __future__ import annotations

import io

import pandas as pd


def markdown_table(df: pd.DataFrame) -> str:
    """``df`` as a GitHub Markdown table (floats to 4 decimals, NaN empty)."""
    if df.empty:
        return "_(no rows)_\n"
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(cell_text(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def cell_text(v) -> str:
    if isinstance(v, float):
        return "" if v != v else f"{v:.4f}"
    return str(v).replace("|", "/") if v is not None else ""


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes (110 dpi); the figure is closed."""
    import matplotlib.pyplot as plt  # deferred: plotting, only when a figure is drawn

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
