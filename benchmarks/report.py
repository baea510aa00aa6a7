"""Shared by the benchmark scripts: print the results as JSON, and keep them in a file when asked."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(results: dict[str, Any], path: str | None) -> None:
    text = json.dumps(results, indent=1, default=float)
    print(text)
    if path:
        Path(path).write_text(text)
