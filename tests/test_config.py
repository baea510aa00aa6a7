"""`--config FILE`: every setting from one YAML or JSON file in the shape of the flows' parameters; options given
on the command line override it; a file that does not fit the command is a clear error."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from storage.errors import ParameterError

CONFIG = """
backbone: {name: mobilenet_v2, weights: none, input_size: 96, backbone_args: {alpha: 0.35}, spectrogram: {n_mels: 64}}
finetune: {epochs: 7, seed: 5, augment: [flip]}
split: {val_fraction: 0.3}
output: {backend: jax}
"""


def _args(argv, tmp_path, text=CONFIG, name="settings.yaml"):
    from cnncodes.cli import apply_config, build_parser

    path = tmp_path / name
    path.write_text(text)
    args = build_parser().parse_args([*argv, "--config", str(path)])
    apply_config(args)
    return args


def test_the_file_gives_every_group_and_the_command_line_overrides_it(tmp_path):
    from cnncodes.cli import _backbone, _output, _split
    from cnncodes.options import settings_from
    from tasks.finetune import FineTuneConfig

    args = _args(["fine-tune", "data", "--epochs", "3", "--n-mels", "32"], tmp_path)
    tuned = settings_from(args, "finetune", FineTuneConfig, seed=args.seed)
    assert (tuned.epochs, tuned.seed, tuned.augment) == (3, 5, ("flip",))  # epochs given; seed and augment: the file
    spec = _backbone(args)
    assert (spec.name, spec.input_size, spec.backbone_args, spec.spectrogram.n_mels) == (
        "mobilenet_v2", 96, {"alpha": 0.35}, 32)
    assert _split(args).val_fraction == 0.3 and _output(args).backend == "jax" and args.backend == "jax"

    args = _args(["fine-tune", "data", "--seed", "9", "--backend", "torch"], tmp_path)
    assert settings_from(args, "finetune", FineTuneConfig, seed=args.seed).seed == 9
    assert _backbone(args).spectrogram.n_mels == 64 and args.backend == "torch"


def test_json_in_the_shape_of_deployment_parameters(tmp_path):
    from cnncodes.options import settings_from
    from tasks.settings import ExportOptions

    args = _args(["export", "--model", "m", "--output", "out"], tmp_path, json.dumps({"options": {"format": "tflite"}}),
                 "settings.json")
    assert settings_from(args, "export", ExportOptions).format == "tflite"


@pytest.mark.parametrize("text,message", [
    (CONFIG, "group(s) finetune that this command does not take; its groups: backbone, extract, output, scale, "
             "split"),
    ("backbone: [resnet50]", "must map settings groups to their settings"),
    ("backbone: {name: resnet50", "is not valid YAML"),
])
def test_a_file_that_does_not_fit_the_command_says_why(tmp_path, text, message):
    with pytest.raises(ParameterError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _args(["extract", "data"], tmp_path, text)


def test_an_unknown_setting_in_the_file_is_named(tmp_path):
    from cnncodes.cli import _split

    args = _args(["extract", "data"], tmp_path, "split: {val_fractoin: 0.3}")
    with pytest.raises(ParameterError, match="SplitConfig has no setting 'val_fractoin'"):
        _split(args)


def test_the_command_reads_the_file_end_to_end(tmp_path):
    """`cnncodes layers` as typed: the file's input size reaches the network; a missing file exits 2, saying so."""
    (tmp_path / "small.yaml").write_text("backbone: {input_size: 64, backbone_args: {alpha: 0.35}}\n")
    run = [sys.executable, "-m", "cnncodes.program", "layers", "mobilenet_v2", "--json"]
    env = {**os.environ, "CNNCODES_RUNNER": "0"}
    done = subprocess.run(run + ["--config", str(tmp_path / "small.yaml")], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    listing = json.loads(done.stdout.strip().splitlines()[-1])
    assert listing["input_size"] == 64 and listing["layers"][-1]["output_shape"][1:] == [2, 2, 1280]
    missing = subprocess.run(run + ["--config", str(tmp_path / "nope.yaml")], capture_output=True, text=True,
                             cwd=ROOT, env=env, timeout=300)
    assert missing.returncode == 2 and "cannot read the settings file" in missing.stderr
