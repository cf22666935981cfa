"""Markdown tables, their HTML rendering and PNG bytes, shared by the report and its sections (fuzzy, explain)."""

from __future__ import annotations

import html
import io
import re

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


PAGE_STYLE = ("<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
              "td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}</style>")


def _inline(text: str) -> str:
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def markdown_to_html(text: str) -> str:
    """The Markdown this package writes (headings, paragraphs, bullets, pipe tables, images, code
    fences) as HTML, so a section reads the same in results.md and report.html."""
    out, table, code = [], [], None
    for line in text.split("\n") + [""]:
        if code is not None:
            if line.startswith("```"):
                out.append(f"<pre>{html.escape(chr(10).join(code))}</pre>")
                code = None
            else:
                code.append(line)
            continue
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if table:
            head, rows = table[0], [r for r in table[1:] if not set("".join(r)) <= set("-: ")]
            out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
                       + "</table>")
            table = []
        if line.startswith("```"):
            code = []
        elif m := re.match(r"^(#{1,3}) (.*)", line):
            out.append(f"<h{len(m[1])}>{_inline(m[2])}</h{len(m[1])}>")
        elif m := re.match(r"^!\[(.*)\]\((.*)\)$", line):
            out.append(f"<img alt='{html.escape(m[1])}' src='{html.escape(m[2])}'/>")
        elif line.startswith("- "):
            out.append(f"<ul><li>{_inline(line[2:])}</li></ul>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    return "\n".join(out).replace("</ul>\n<ul>", "\n")
