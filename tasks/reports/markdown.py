"""Run reports: Markdown for people, JSON beside it for machines."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from storage.files import atomic_write


def extract_table(summary: dict[str, Any]) -> list[dict[str, Any]]:
    t = summary["timings"]
    return [{"images": summary["images"], "computed": summary["computed"], "reused": summary["reused"],
             "removed": summary["removed"], "skipped": len(summary["skipped"]),
             "up_to_date": summary["up_to_date"], "total_s": t.get("total"), "forward_s": t.get("forward"),
             "images_per_s": summary.get("images_per_s")}]


def extract_markdown(summary: dict[str, Any]) -> str:
    lines = ["# Extraction report", "", f"- store: `{summary['store']}`",
             f"- backbone: `{summary['backbone']}`, weights: `{summary['weights']}`",
             f"- classes ({len(summary['classes'])}): {', '.join(summary['classes'])}", ""]
    if summary["up_to_date"]:
        lines += ["The store was already up to date with this dataset: nothing was computed.", ""]
    lines += ["| images | computed | reused | removed | skipped | images/s |", "|---|---|---|---|---|---|",
              f"| {summary['images']} | {summary['computed']} | {summary['reused']} | {summary['removed']} | "
              f"{len(summary['skipped'])} | {summary.get('images_per_s') or '-'} |", "",
              "## Groups", "", "| layer | pooling | rows | feature shape |", "|---|---|---|---|"]
    for g in summary["groups"]:
        lines.append(f"| `{g['layer']}` | {g['pooling']} | {g['rows']} | {g['feature_shape']} |")
    lines += ["", "## Images per split and class", "", "| split | " + " | ".join(summary["classes"]) + " |",
              "|---|" + "---|" * len(summary["classes"])]
    for split, per in sorted(summary["counts"].items()):
        lines.append(f"| {split} | " + " | ".join(str(per.get(c, 0)) for c in summary["classes"]) + " |")
    lines += ["", "## Timings (s)", ""]
    lines += [f"- {k}: {v}" for k, v in summary["timings"].items()]
    lines += ["", f"## Skipped files ({len(summary['skipped'])})", ""]
    if summary["skipped"]:
        lines += ["| file | reason |", "|---|---|"]
        lines += [f"| `{s['path']}` | {s['reason']} |" for s in summary["skipped"]]
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def write_report(path: str | Path, markdown: str, data: dict[str, Any]) -> Path:
    """Write ``path`` (Markdown) and ``path`` with suffix .json, each atomically."""
    path = Path(path)
    atomic_write(path, markdown)
    atomic_write(path.with_suffix(".json"), json.dumps(data, indent=1, default=str))
    return path
