"""The README and docs/ stay true: their examples run or parse, their deployments exist, their links resolve."""
from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import subprocess
import sys
import typing

import pytest

from conftest import ROOT

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", flags=re.S | re.M)
FLOW_NAMES = {"transfer", "extract-features", "train-linear", "sweep", "fine-tune", "predict", "retrain", "demo",
              "export"}
# Options of other programs that the docs mention in backticks.
FOREIGN_OPTIONS = {"--help", "--param", "--params", "--watch", "--config-settings"}


def _rel(path) -> str:
    return str(path.relative_to(ROOT))


def _fences(path) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block of a Markdown file."""
    return FENCE.findall(path.read_text())


def _blocks(path, lang: str) -> list[str]:
    return [body for language, body in _fences(path) if language == lang]


def _logical_lines(body: str) -> list[str]:
    """Lines of a code block with trailing-backslash continuations joined."""
    lines, current = [], ""
    for line in body.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    if current:
        lines.append(current)
    return lines


def _shell_lines() -> list[tuple[str, str]]:
    """(page, line) of every line of every non-Python fenced block of the README and docs/."""
    return [(_rel(p), line) for p in PAGES for lang, body in _fences(p) if lang != "python"
            for line in _logical_lines(body)]


def _command(line: str) -> list[str] | None:
    """The arguments after `cnncodes` when the line runs it (after VAR=value prefixes and a .venv/bin/ path)."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
        words = words[1:]
    if words and (words[0] == "cnncodes" or words[0].endswith("/bin/cnncodes")):
        return words[1:]
    return None


def _parse_error(parser, argv: list[str]) -> str | None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            return err.getvalue().strip().splitlines()[-1] if exc.code else None
    return None


def test_the_worked_analyst_example_runs_on_a_store(tmp_path):
    """The embedding example of docs/stores.md, against a store made like `make run` makes it (in tmp)."""
    import numpy as np

    from storage import Manifest, Sample
    from storage.store import GroupSpec, StoreWriter

    example = next(b for b in _blocks(ROOT / "docs" / "stores.md", "python") if "embedding.png" in b)
    store = tmp_path / "cnncodes-out" / "stores" / "demo-data__mobilenet-alpha0.25__imagenet.h5"
    rng = np.random.default_rng(0)
    names = ["blobs", "checks", "rings", "stripes"]
    samples = [Sample(f"{names[c]}/{i}.jpg", f"{c}{i:063x}", c, "val" if i % 5 == 0 else "train")
               for c in range(4) for i in range(30)]
    X = (rng.normal(0, 1, (4, 256))[[s.label for s in samples]] + rng.normal(0, 1, (120, 256))).astype("f4")
    spec = GroupSpec("conv_pw_13_relu", "avg", (256,))
    with StoreWriter(store, {"backbone": "mobilenet"}, [spec]) as w:
        m = Manifest("/d", "folders", names, samples)
        w.plan(m)
        w.start_appending()
        w.append(spec.name, [s.path for s in samples], [s.sha256 for s in samples], [s.label for s in samples],
                 [s.split for s in samples], X)
        w.finish(m)
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + example
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    acc = float(re.search(r"val accuracy of my own classifier: ([0-9.]+)", out.stdout).group(1))
    assert acc > 0.8
    png = tmp_path / "cnncodes-out" / "embedding.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10000


def test_every_python_block_compiles_and_its_imports_work():
    """The other Python examples need a store or a dataset to run; their syntax and imports are checked."""
    import ast
    import importlib

    blocks = [(p, b) for p in PAGES for b in _blocks(p, "python")]
    failures = []
    for page, block in blocks:
        tree = ast.parse(block, filename=_rel(page))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                failures += [f"{_rel(page)}: from {node.module} import {a.name}" for a in node.names
                             if not hasattr(module, a.name)]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    importlib.import_module(a.name)
    assert not failures, f"names the examples import that do not exist: {failures}"
    assert len(blocks) >= 5


def test_the_readme_is_a_front_door():
    """Short; the two set-up commands in its first code block; every page of docs/ linked from it."""
    text = README.read_text()
    assert len(text.encode()) < 8192, f"README.md is {len(text.encode())} bytes: reference material goes to docs/"
    first = _fences(README)[0][1]
    assert "make run" in first and "make test" in first
    assert DOCS, "docs/ has no pages"
    orphans = [_rel(p) for p in DOCS if f"({_rel(p)})" not in text]
    assert not orphans, f"pages of docs/ that README.md does not link: {orphans}"


def test_every_cnncodes_command_line_in_the_docs_parses():
    """Every `cnncodes ...` line of a code block is accepted by the real parser (files are not touched)."""
    from cnncodes.cli import build_parser

    parser = build_parser()
    checked, failures = 0, []
    for page, line in _shell_lines():
        argv = _command(line)
        if argv is None or "..." in line or "…" in line:
            continue
        checked += 1
        error = _parse_error(parser, argv)
        if error:
            failures.append(f"{page}: {line.strip()}\n    {error}")
    assert not failures, "command lines the CLI refuses:\n" + "\n".join(failures)
    assert checked >= 30, f"only {checked} cnncodes command lines found: is the block parser broken?"


def test_the_parse_check_catches_a_wrong_option():
    """The check above is real: a misspelt option or a missing required one fails to parse."""
    from cnncodes.cli import build_parser

    parser = build_parser()
    assert _parse_error(parser, _command("cnncodes extract DATA --layer x --no-such-option 1")) is not None
    assert _parse_error(parser, _command("cnncodes train-linear STORE")) is not None  # --layer is required
    assert _parse_error(parser, _command("KERAS_HOME=/k cnncodes extract DATA --layer x  # comment")) is None
    assert _command("cnncodes-out/stores/x.h5") is None


def _all_cli_options() -> set[str]:
    import argparse

    from cnncodes.cli import build_parser

    found: set[str] = set()

    def walk(p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            found.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(build_parser())
    return found


def test_every_option_named_in_the_docs_exists():
    """An option in backticks (`--name`, in prose and tables) is an option of some cnncodes command."""
    known = _all_cli_options() | FOREIGN_OPTIONS
    unknown = sorted({f"{_rel(p)}: {o}" for p in PAGES
                      for o in re.findall(r"`(--[A-Za-z0-9][A-Za-z0-9-]*)", FENCE.sub("", p.read_text()))
                      if o not in known})
    assert not unknown, f"options the CLI does not have: {unknown}"


def _deployments() -> dict[str, object]:
    """Deployment name -> its flow object, from deployments/prefect.yaml."""
    import importlib

    import yaml

    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    flows = {}
    for d in spec["deployments"]:
        path, func = d["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flows[d["name"]] = getattr(module, func)
    return flows


def _deployment_runs() -> list[tuple[str, str]]:
    """(where, line) of every `prefect deployment run` in the docs' code blocks and prefect.yaml's comments."""
    runs = [(page, line) for page, line in _shell_lines() if "prefect deployment run" in line]
    yaml_text = (ROOT / "deployments" / "prefect.yaml").read_text()
    runs += [("deployments/prefect.yaml", line.lstrip("# ")) for line in yaml_text.splitlines()
             if line.lstrip().startswith("#") and "prefect deployment run" in line]
    return runs


def _group_model(flow, name: str):
    """The settings model of a flow parameter, or None when it is a plain value."""
    from pydantic import BaseModel

    hint = typing.get_type_hints(flow.fn).get(name)
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _deployment_run_problems(line: str, deployments: dict[str, object]) -> list[str]:
    import inspect

    words = shlex.split(line[line.index("prefect deployment run"):], comments=True)
    target = words[3]
    flow_name, _, deployment = target.partition("/")
    problems = []
    if flow_name not in FLOW_NAMES:
        problems.append(f"{flow_name!r} is not a cnncodes flow")
    if deployment not in deployments:
        return problems + [f"no deployment named {deployment!r} in deployments/prefect.yaml"]
    flow = deployments[deployment]
    if flow.name != flow_name:
        problems.append(f"deployment {deployment!r} runs flow {flow.name!r}: run it as '{flow.name}/{deployment}'")
    given: dict[str, object] = {}
    rest = words[4:]
    for option, value in zip(rest, rest[1:]):
        if option == "--param":
            key, _, v = value.partition("=")
            given[key] = v
        elif option == "--params":
            given.update(json.loads(value))
    parameters = inspect.signature(flow.fn).parameters
    for key, value in given.items():
        if key not in parameters:
            problems.append(f"flow {flow.name!r} has no parameter {key!r} (it has {', '.join(parameters)})")
            continue
        model = _group_model(flow, key)
        if model is not None and isinstance(value, dict):
            extra = sorted(set(value) - set(model.model_fields))
            if extra:
                problems.append(f"{key} ({model.__name__}) has no field {extra}")
    return problems


def test_every_deployment_run_in_the_docs_names_a_deployment_and_its_parameters():
    deployments = _deployments()
    assert {f.name for f in deployments.values()} <= FLOW_NAMES
    runs = _deployment_runs()
    failures = [f"{where}: {line.strip()}\n    {problem}" for where, line in runs
                for problem in _deployment_run_problems(line, deployments)]
    assert not failures, "deployment runs that would fail:\n" + "\n".join(failures)
    assert len(runs) >= 8, f"only {len(runs)} `prefect deployment run` lines found"


def test_the_deployment_check_catches_wrong_names_and_parameters():
    deployments = _deployments()
    assert not _deployment_run_problems("prefect deployment run 'retrain/retrain' --param model=m", deployments)
    assert _deployment_run_problems("prefect deployment run 'extract/extract'", deployments)  # flow: extract-features
    assert _deployment_run_problems("prefect deployment run 'transfer/nightly'", deployments)
    assert _deployment_run_problems("prefect deployment run 'retrain/retrain' --param models=m", deployments)
    assert _deployment_run_problems(
        """prefect deployment run 'transfer/transfer' --params '{"output": {"out_dir": "x"}}'""", deployments)


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def _links() -> list[tuple[object, str]]:
    return [(p, target) for p in PAGES
            for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", FENCE.sub("", p.read_text()))]


def _link_problem(page, target: str) -> str | None:
    if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
        return None
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    if not dest.exists():
        return f"{target}: no such file"
    if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
        return f"{target}: no heading with anchor #{anchor} in {dest.name}"
    return None


def test_every_relative_link_points_at_a_file_that_exists():
    links = _links()
    failures = [f"{_rel(page)}: {problem}" for page, target in links
                if (problem := _link_problem(page, target))]
    assert not failures, "broken links:\n" + "\n".join(failures)
    assert len(links) >= 20, f"only {len(links)} links found"


REPO_PATH = re.compile(r"`((?:flows|tasks|storage|cnncodes|tests|deployments|benchmarks|docs)/[\w./-]*\w)`")


def test_every_file_of_the_repository_named_in_backticks_exists():
    """`tasks/probe/linear.py`, `storage/format.py`... in prose and tables: the files are there."""
    named = [(p, m) for p in PAGES for m in REPO_PATH.findall(FENCE.sub("", p.read_text()))]
    missing = [f"{_rel(p)}: {m}" for p, m in named if not (ROOT / m).exists()]
    assert not missing, f"files the docs name that do not exist: {missing}"
    assert len(named) >= 10, f"only {len(named)} file names found"
    assert REPO_PATH.findall("see `tasks/linear.py` and `storage/format.py`.") == ["tasks/linear.py",
                                                                                   "storage/format.py"]


def test_the_link_check_catches_a_broken_link():
    page = ROOT / "docs" / "transfer.md"
    assert _link_problem(page, "linear.md#flow-sweep") is None
    assert _link_problem(page, "../BENCHMARKS.md") is None
    assert _link_problem(page, "no-such-page.md") is not None
    assert _link_problem(page, "linear.md#no-such-heading") is not None
    assert _link_problem(page, "BENCHMARKS.md") is not None  # relative to docs/, not the root


@pytest.mark.parametrize("heading,anchor", [("Flow `sweep`", "flow-sweep"),
                                            ("Run as deployments; from laptop to cluster",
                                             "run-as-deployments-from-laptop-to-cluster")])
def test_anchor_slugs(heading, anchor):
    assert _slug(heading) == anchor
