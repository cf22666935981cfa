"""One Markdown summary of a benchmark folder: the throughput results side by side (each path's
images/s and its ratio to the model-only ceiling), then, when present, the ``dtl main`` results
table and the champion's model card. ``bench/device_run.sh`` writes it into ``$OUT``.

    python -m bench.summary <folder with bench/*.json and report/>   # Markdown on stdout
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PATHS = (("a_model_only_img_s", "model only (ceiling)"), ("b_project_img_s", "project training path"),
         ("c_plain_img_s", "plain ImageFolder + DataLoader"), ("d_kornia_img_s", "kornia augmentation"),
         ("eval_project_img_s", "eval (project path)"), ("pyfunc_cpu_img_s_batch32", "pyfunc, CPU, batch 32"))


def ratios(res: dict) -> dict[str, float]:
    """Each measured path's images/s over the model-only ceiling (``ratio_to_ceiling``)."""
    top = res.get("a_model_only_img_s")
    return {k: res[k] / top for k, _ in PATHS if top and res.get(k)}


def compiled(res: dict) -> str:
    """The torch.compile backend of a result ("no" when eager; older results stored True)."""
    c = res.get("compile")
    return "inductor" if c is True else (c or "no")


def throughput_table(results: list[dict]) -> str:
    """One row per (backbone, compile, path): images/s and ratio to the ceiling."""
    rows = ["| backbone | input | batch | precision | compile | path | images/s | ratio to ceiling |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        rt = ratios(r)
        for key, label in PATHS:
            if r.get(key):
                ratio = f"{rt[key]:.2f}" if key in rt else "–"
                speed = f"{r[key]:,.1f}" if r[key] >= 10 else f"{r[key]:.3g}"
                rows.append(f"| {r['backbone']} | {r['input']} | {r['batch_size']} | {r['precision']} | "
                            f"{compiled(r)} | {label} | {speed} | {ratio} |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    folder = Path(argv[0])
    results = [json.loads(f.read_text()) for f in sorted((folder / "bench").glob("*.json"))]
    parts = ["# Device run summary\n"]
    env = folder / "environment.txt"
    if env.is_file():
        parts.append("```\n" + env.read_text().strip() + "\n```\n")
    if results:
        devices = sorted({r["device"] for r in results})
        parts.append(f"## Throughput ({', '.join(devices)})\n\n" + throughput_table(results))
    table = folder / "report" / "results.md"
    if table.is_file():
        parts.append("## dtl main --config real-gpu\n\n" + table.read_text())
    for card in sorted((folder / "cards").glob("*.md")):
        parts.append(f"## Model card: {card.stem}\n\n" + card.read_text())
    print("\n".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
