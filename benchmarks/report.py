"""Shared by the benchmark scripts: print the results as JSON, and keep them in a file when asked."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(results: dict[str, Any], path: str | None) -> None:
    print(save(results, path))


def save(results: dict[str, Any], path: str | None) -> str:
    """The results as the JSON text of a results file, written to ``path`` when given."""
    text = json.dumps(results, indent=1, default=float)
    if path:
        Path(path).write_text(text)
    return text
