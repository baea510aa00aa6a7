"""BENCHMARKS.md is rendered from its template and the results files: no figure in it is typed in."""
from __future__ import annotations

import re
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import render  # noqa: E402  benchmarks/render.py


def test_benchmarks_md_is_what_the_results_render_to():
    text = render.render(render.TEMPLATE.read_text(), render.load_results())
    assert (ROOT / "BENCHMARKS.md").read_text() == text, "run .venv/bin/python benchmarks/render.py"


def test_every_measured_figure_in_a_table_is_a_placeholder():
    """A table cell with a decimal number must come from a results file, unless it is a target or goal."""
    typed = []
    header: list[str] = []
    for line in render.TEMPLATE.read_text().splitlines():
        if not line.startswith("|"):
            header = []
            continue
        line = render.PLACEHOLDER.sub("§", line)  # a placeholder's format spec holds a "|" of its own
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not header:
            header = cells
            continue
        for name, cell in zip(header, cells):
            bare = re.sub(r"\((target|goal)[^)]*\)|[≥≤] ?[\d.]+|`[^`]*`", "", cell)
            if re.search(r"\d\.\d", bare) and not re.search(r"target|goal|backbone|dataset|^data$", name, re.I):
                typed.append(f"{name}: {cell}")
    assert not typed, typed


def test_a_missing_value_is_an_error_not_a_blank():
    with pytest.raises(render.RenderError, match="has no 'nope'"):
        render.render("{{store-cpu:nope|.1f}}", render.load_results())
    with pytest.raises(render.RenderError, match="only arithmetic"):
        render.render("{{= __import__('os') }}", render.load_results())
    assert render.render("{{= store-cpu:rows / 1000 |.0f}}", {"store-cpu": {"rows": 100000}}).endswith("100")
