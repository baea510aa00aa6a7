"""The shape of the code (issue 13): flows take a few settings groups, the CLI declares each shared option
once and generates the rest from the settings models, and no module imports itself through others."""
from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
import pytest

from conftest import ROOT

PACKAGES = ("storage", "tasks", "flows", "cnncodes")

def _flows():
    from prefect import Flow

    import flows.demo
    import flows.export
    import flows.extract_features
    import flows.fine_tune
    import flows.predict
    import flows.retrain
    import flows.sweep
    import flows.train_linear
    import flows.transfer

    mods = [flows.demo, flows.export, flows.extract_features, flows.fine_tune, flows.predict, flows.retrain, flows.sweep,
            flows.train_linear, flows.transfer]
    found = {obj.name: obj for m in mods for obj in vars(m).values() if isinstance(obj, Flow)}
    assert len(found) >= 9, sorted(found)
    return found


def test_no_flow_takes_more_than_eight_parameters():
    too_many = {name: len(inspect.signature(f.fn).parameters) for name, f in _flows().items()
                if len(inspect.signature(f.fn).parameters) > 8}
    assert not too_many, too_many


def test_shared_options_are_declared_once_and_settings_options_are_generated():
    source = (ROOT / "cnncodes" / "cli.py").read_text()
    for option in ("--json", "--seed", "--out", "--registry", "--model-name", "--backbone", "--precision",
                   "--batch-size", "--val-fraction", "--epochs"):
        declared = len(re.findall(rf'add_argument\(\s*"{option}"', source))
        assert declared <= 1, f"{option} is declared {declared} times in cnncodes/cli.py"


@pytest.mark.parametrize("command,models", [
    ("extract", ["BackboneSpec", "ExtractOptions", "SplitConfig", "ScaleOut"]),
    ("fine-tune", ["BackboneSpec", "FineTuneConfig", "SplitConfig"]),
    ("train-linear", ["LinearConfig"]),
    ("export", ["ExportOptions"]),
])
def test_every_setting_of_a_command_is_an_option_with_its_description(command, models):
    from cnncodes.cli import build_parser
    from cnncodes.options import OVERRIDES
    from tasks import backbones, extract, finetune, settings
    from tasks.probe import linear

    classes = {c.__name__: c for c in (backbones.BackboneSpec, extract.ExtractOptions, settings.SplitConfig,
                                        settings.ScaleOut, finetune.FineTuneConfig, linear.LinearConfig,
                                        settings.ExportOptions)}
    sub = next(a for a in build_parser(show_all=True)._actions if a.dest == "command").choices[command]
    by_dest = {a.dest: a for a in sub._actions}
    models = list(models)
    for model in models:
        for name, field in classes[model].model_fields.items():
            nested = field.annotation if isinstance(field.annotation, type) and issubclass(
                field.annotation, settings.Settings) else None
            if nested is not None:  # a settings group inside another (the backbone's spectrogram recipe)
                classes[nested.__name__] = nested
                models.append(nested.__name__)
                continue
            if name == "seed":
                assert "seed" in by_dest  # one --seed sets every seed
                continue
            group = next(d.split(".")[0] for d in by_dest if d.endswith("." + name) and "." in d)
            action = by_dest[f"{group}.{name}"]
            override = OVERRIDES.get((model, name))
            assert (override and override.help) or field.description.split(" (")[0][:30] in action.help, name


@pytest.mark.parametrize("command", ["extract", "train-linear", "sweep", "predict", "export", "fine-tune", "transfer",
                                     "retrain"])
def test_everyday_help_fits_a_screen_and_help_all_lists_every_option(command, capsys):
    """`--help` shows a command's everyday options (about a dozen) and points to `--help-all`, which shows every
    option; a hidden option still works."""
    from cnncodes.cli import _main

    def options(flag: str) -> list[str]:
        with pytest.raises(SystemExit):
            _main([command, flag])
        text = capsys.readouterr().out
        return [line.split()[0].rstrip(",") for line in text.splitlines() if line.startswith("  -")], text

    everyday, text = options("--help")
    every, _ = options("--help-all")
    assert len(everyday) <= 15, (len(everyday), everyday)
    assert set(everyday) <= set(every) and "--config" in everyday and "--backend" in everyday
    hidden = len(every) - len(everyday)
    assert (f"{hidden} more options: cnncodes {command} --help-all" in " ".join(text.split())) == (hidden > 0)


def test_a_hidden_option_still_parses():
    from cnncodes.cli import build_parser

    args = build_parser().parse_args(["transfer", "data", "--mixup", "0.2", "--large-per-class", "50"])
    assert vars(args)["finetune.mixup"] == 0.2 and vars(args)["thresholds.large_per_class"] == 50


def test_retrain_has_a_command():
    from cnncodes.cli import COMMANDS, build_parser

    args = build_parser().parse_args(["retrain", "data", "--model", "m", "--margin", "0.02", "--force"])
    assert COMMANDS["retrain"] and args.model == "m" and args.margin == 0.02 and args.force


def test_one_preprocessing_table_covers_every_family():
    from tasks.backbones import FAMILY_MODES, MODES, REGISTRY, BackboneSpec, preprocess_mode

    assert {info.module for info in REGISTRY.values()} <= set(FAMILY_MODES)
    assert set(FAMILY_MODES.values()) <= set(MODES)
    for name in REGISTRY:  # the layer form of fine-tuning exists for every registered backbone
        assert preprocess_mode(BackboneSpec(name=name, weights="none")) in MODES


def _imports(path: Path, package_root: Path) -> set[str]:
    """Project modules imported anywhere in ``path`` (module level or inside functions)."""
    module = ".".join(path.relative_to(package_root).with_suffix("").parts)
    if module.endswith(".__init__"):
        module = module[: -len(".__init__")]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level] if not path.name == "__init__.py" else \
                    module.split(".")[: len(module.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.split(".")[0] in PACKAGES}


def test_no_import_cycle_between_project_modules():
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {m: {i for i in _imports(p, ROOT) if i in files and i != m} for m, p in files.items()}
    cyclic = []
    for start in graph:  # a module that reaches itself through its imports is on a cycle
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])
        if start in seen:
            cyclic.append(start)
    assert not cyclic, f"modules on an import cycle: {sorted(cyclic)}"


def test_every_flow_returns_a_typed_result_read_by_its_fields():
    import typing

    from tasks.results import ExtractResult, Result

    for name, f in _flows().items():
        returned = typing.get_type_hints(f.fn)["return"]
        assert isinstance(returned, type) and issubclass(returned, Result), (name, returned)
    r = ExtractResult(store="s.h5", groups=[], images=3, classes=["a"], counts={}, computed=3, reused=0, removed=0,
                      up_to_date=False, skipped=[], timings={"total": 1.0}, manifest_fingerprint="f", shards=["x"])
    assert r.store == "s.h5" and r.shards == ["x"]  # an extra detail is kept as a field
    assert r.as_dict()["computed"] == 3 and r.as_dict()["shards"] == ["x"]
    with pytest.raises(TypeError):  # not a mapping: no second way to read a field
        r["store"]


def _product_files():
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def test_no_function_of_the_product_is_over_80_lines():
    long = []
    for path in _product_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these into named phases: " + "; ".join(long)


def test_no_module_imports_another_modules_private_names():
    found = []
    for path in _product_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in PACKAGES):
                found += [f"{path.relative_to(ROOT)}:{node.lineno} {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, "make these public or move them where they are used: " + "; ".join(found)


# another library's private names: only tasks/internals.py may use them (with a fallback and a test)
PRIVATE_OF_OTHERS = re.compile(r"keras\.src\b|prefect\._internal|threading\._shutdown|atexit\._run_exitfuncs|"
                               r"PREFECT__SERVER_|h5py\._hl|sklearn\.\w+\._")


def test_other_libraries_private_names_live_in_tasks_internals_only():
    found = [f"{path.relative_to(ROOT)}: {m.group(0)}" for path in _product_files()
             if path != ROOT / "tasks" / "internals.py" for m in PRIVATE_OF_OTHERS.finditer(path.read_text())]
    assert not found, "move these into tasks/internals.py (with a fallback and a test): " + "; ".join(found)
