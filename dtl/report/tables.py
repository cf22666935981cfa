"""Markdown tables, their HTML rendering and PNG bytes, shared by the report and its sections (fuzzy, explain)."""

from __future__ import annotations

import base64
import html
import io

import pandas as pd
from markdown_it import MarkdownIt


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
    """A table cell: floats to 4 decimals, NaN and None empty, ``|`` escaped (kept, not replaced)."""
    if isinstance(v, float):
        return "" if v != v else f"{v:.4f}"
    return str(v).replace("|", "\\|").replace("\n", " ") if v is not None else ""


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes (110 dpi); the figure is closed."""
    import matplotlib.pyplot as plt  # deferred: plotting, only when a figure is drawn

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


PAGE_STYLE = ("<style>body{font-family:sans-serif;margin:2em;max-width:1400px}"
              "table{border-collapse:collapse;font-size:12px;display:block;overflow-x:auto;max-width:100%}"
              "td,th{border:1px solid #ccc;padding:3px 6px;white-space:nowrap}img{max-width:100%}"
              "code{background:#f4f4f4;padding:0 3px}</style>")

_MD = MarkdownIt("commonmark", {"html": False}).enable("table")


def markdown_to_html(text: str, images: dict[str, bytes] | None = None) -> str:
    """Markdown (CommonMark + pipe tables, rendered by markdown-it-py) as HTML, so a page reads the
    same in results.md and report.html: emphasis, links, lists, code and tables. Images whose file
    name is a key of ``images`` are embedded as PNG data URIs (a single self-contained page)."""
    out = _MD.render(text)
    for name, data in (images or {}).items():
        uri = "data:image/png;base64," + base64.b64encode(data).decode()
        out = out.replace(f'src="{html.escape(name)}"', f'src="{uri}"')
    return out


def html_page(title: str, markdown: str, images: dict[str, bytes] | None = None) -> str:
    """A self-contained HTML page of ``markdown`` (figures embedded)."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{PAGE_STYLE}"
            f"</head><body>{markdown_to_html(markdown, images)}</body></html>")
