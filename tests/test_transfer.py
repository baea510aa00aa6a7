"""The transfer flow: measurements, the four routes (measured and forced), the champion gate, the report."""
from __future__ import annotations

from pathlib import Path

import pytest

from storage import ModelRegistry, ParameterError
from storage.manifest import Manifest, Sample
from tasks.decide import transfer as tr
from tasks.backbones import BackboneSpec
from tasks.finetune import FineTuneConfig
from tasks.settings import Output
from tasks.decide.transfer import Thresholds

ROWS_LATE_WINS = [{"layer": "early", "pooling": "avg", "dims": 8, "mean": 0.70, "std": 0.05},
                  {"layer": "late", "pooling": "avg", "dims": 16, "mean": 0.90, "std": 0.03}]
ROWS_EARLY_WINS = [{"layer": "early", "pooling": "avg", "dims": 8, "mean": 0.90, "std": 0.05},
                   {"layer": "late", "pooling": "avg", "dims": 16, "mean": 0.60, "std": 0.03}]


def manifest(per_class: int) -> Manifest:
    return Manifest("/d", "folders", ["a", "b"], [Sample(f"{c}/{i}", f"{i:064x}", k, "train")
                                                 for k, c in enumerate("ab") for i in range(per_class)])


@pytest.mark.parametrize("per_class,rows,case,layer", [
    (50, ROWS_LATE_WINS, 1, "late"), (50, ROWS_EARLY_WINS, 2, "early"),
    (800, ROWS_LATE_WINS, 3, "late"), (800, ROWS_EARLY_WINS, 4, "early")])
def test_measurements_choose_each_of_the_four_cases(per_class, rows, case, layer):
    size = tr.measure_size(manifest(per_class), 500)
    sim = tr.measure_similarity(rows, "late", 0.02, pretrained=True)
    d = tr.decide(size, sim, top_freeze="until:x")
    assert d.case == case and d.probe_layer == layer and d.finetune == (case in (3, 4))
    assert d.freeze == {1: None, 2: None, 3: "until:x", 4: "none"}[case]
    assert f"Measured case: {case}" in d.reason and not d.forced


def test_similarity_margin_ties_and_random_weights():
    close = [{"layer": "early", "mean": 0.80}, {"layer": "late", "mean": 0.79}]
    assert tr.measure_similarity(close, "late", 0.02, True).similar        # within the margin: similar
    assert not tr.measure_similarity(close, "late", 0.0, True).similar
    sim = tr.measure_similarity(ROWS_LATE_WINS, "late", 0.02, pretrained=False)
    assert not sim.similar and "random weights" in sim.note
    with pytest.raises(ParameterError, match="no score for the late layer"):
        tr.measure_similarity(close, "conv9", 0.02, True)


def test_forcing_a_case_and_a_layer():
    size, sim = tr.measure_size(manifest(50), 500), tr.measure_similarity(ROWS_LATE_WINS, "late", 0.02, True)
    d = tr.decide(size, sim, force_case=4, from_scratch=True)
    assert d.case == 4 and d.forced and d.from_scratch and "Case 4 was forced" in d.reason
    assert tr.decide(size, sim, force_layer="early").probe_layer == "early"
    with pytest.raises(ParameterError, match="case must be"):
        tr.decide(size, sim, force_case=5)


def test_size_uses_the_median_class():
    m = manifest(600)
    m.samples = m.samples + [Sample(f"c/{i}", f"c{i:063x}", 2, "train") for i in range(10)]
    m.class_names = ["a", "b", "c"]
    s = tr.measure_size(m, 500)
    assert s.median_per_class == 600 and s.smallest_class == 10 and s.large


def _outcomes(tmp_path, name: str, correct: list[bool], split: str = "test") -> dict:
    """A model's metrics on ``split`` with per-image outcomes: image i has label i % 2."""
    from tasks.reports.evaluate import write_outcomes

    y = [i % 2 for i in range(len(correct))]
    pred = [t if c else 1 - t for t, c in zip(y, correct)]
    path = write_outcomes(tmp_path / f"{name}.outcomes-{split}.csv", [f"img{i}.png" for i in range(len(y))],
                          [f"{i:064x}" for i in range(len(y))], y, pred)
    return {"accuracy": sum(correct) / len(correct), "outcomes": str(path)}


def test_gate_needs_the_margin_and_an_interval_above_zero(tmp_path):
    n = 200
    probe = {"metrics": {"test": _outcomes(tmp_path, "p", [i < 160 for i in range(n)])}}      # 0.80
    better = {"metrics": {"test": _outcomes(tmp_path, "f", [i < 190 for i in range(n)])}}    # 0.95, never worse
    g = tr.gate(better, probe, 0.01)
    assert g["promoted"] == "finetuned" and g["split"] == "test" and g["warning"] is None
    assert g["difference"] == pytest.approx(0.15) and 0 < g["interval"][0] < 0.15 < g["interval"][1]
    # +0.015 over the margin, but from 3 images more right and none wrong... and 0 vs 3: within noise
    noisy = {"metrics": {"test": _outcomes(tmp_path, "n", [i < 163 for i in range(n)])}}
    g = tr.gate(noisy, probe, 0.01)
    assert g["difference"] == pytest.approx(0.015) and g["interval"][0] <= 0
    assert g["promoted"] == "probe" and "within the noise" in g["reason"]
    # a clear difference that misses the margin
    g = tr.gate(better, probe, 0.2)
    assert g["promoted"] == "probe" and "below the margin" in g["reason"]
    assert tr.gate(None, probe, 0.01)["promoted"] == "probe"


def test_gate_decides_on_test_and_warns_on_val(tmp_path):
    n = 100
    # better on val (which selection saw) but worse on test: test decides
    probe = {"metrics": {"val": _outcomes(tmp_path, "pv", [i < 50 for i in range(n)], "val"),
                         "test": _outcomes(tmp_path, "pt", [i < 90 for i in range(n)])}}
    ft = {"metrics": {"val": _outcomes(tmp_path, "fv", [True] * n, "val"),
                      "test": _outcomes(tmp_path, "ft", [i < 60 for i in range(n)])}}
    g = tr.gate(ft, probe, 0.0)
    assert g["split"] == "test" and g["promoted"] == "probe" and g["difference"] == pytest.approx(-0.3)
    assert g["accuracies"]["finetuned"] == {"val": 1.0, "test": 0.6}
    only_val = tr.gate({"metrics": {"val": ft["metrics"]["val"]}}, {"metrics": {"val": probe["metrics"]["val"]}}, 0)
    assert only_val["split"] == "val" and only_val["promoted"] == "finetuned" and "optimistic" in only_val["warning"]


def test_candidate_layers_one_per_resolution():
    layers = [{"name": n, "stride": s, "output_shape": [None, 1, 1, 1], "kind": k}
              for n, s, k in [("a", 2, "ReLU"), ("b", 8, "ReLU"), ("c", 8, "ReLU"), ("pad", 8, "ZeroPadding2D"),
                              ("d", 16, "Add"), ("e", 32, "ReLU"), ("f", 32, "ReLU")]]
    assert tr.candidate_layers(layers) == ["c", "d", "f"]  # the padding layer at stride 8 is not a cut point
    assert tr.top_freeze_for(layers) == "until:d"


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def test_sound_candidates_offer_only_the_time_segments_a_map_is_wide_enough_for():
    layers = [{"name": "wide", "output_shape": [None, 14, 14, 8]}, {"name": "narrow", "output_shape": [None, 4, 3, 8]},
              {"name": "unknown", "output_shape": [None, None, None, 8]}, {"name": "flat", "output_shape": [None, 8]}]
    names = ["wide", "narrow", "unknown"]
    assert tr.candidate_codes(layers, names, "image") == [(n, "avg") for n in names]
    codes = tr.candidate_codes(layers, names, "audio")
    assert [p for n, p in codes if n == "wide"] == list(tr.SOUND_POOLINGS)
    assert [p for n, p in codes if n == "narrow"] == ["avg", "time-avg", "time-avg2", "time-avg3"]  # 3 columns
    assert [p for n, p in codes if n == "unknown"] == list(tr.SOUND_POOLINGS)  # width known only at run time


TINY_FLOW = dict(backbone=BackboneSpec(name="mobilenet_v2", weights="none", input_size=96,
                                       backbone_args={"alpha": 0.35}),
                 finetune=FineTuneConfig(epochs=1, head_epochs=0, batch_size=8, optimizer="adam"))


@pytest.mark.slow
@pytest.mark.parametrize("kwargs,case,promoted", [
    (dict(large_per_class=1000), 2, "probe"),                        # measured: small, random weights -> 2
    (dict(large_per_class=5, gate_margin=-1.0), 4, "finetuned"),     # measured: large -> 4; gate always promotes
    (dict(case=1), 1, "probe"),                                      # forced
    (dict(case=3, gate_margin=1.0), 3, "probe"),                     # forced; gate never promotes
])
def test_transfer_flow_routes_gates_and_reports(harness, tmp_path, texture_data, kwargs, case, promoted):
    from flows.transfer import transfer

    flow_args = dict(TINY_FLOW)
    if case == 4:  # AdaBN at evaluation; the test split (6 images, no groups) is one group, too small to adapt
        flow_args["finetune"] = FineTuneConfig(**{**TINY_FLOW["finetune"].as_dict(), "adapt_batchnorm": True,
                                                  "freeze_batchnorm": False})
    r = transfer(str(texture_data), thresholds=Thresholds(**kwargs), output=Output(out=str(tmp_path / "out")),
                 **flow_args)
    assert r.case == case and r.gate["promoted"] == promoted
    assert (r.finetuned is not None) == (case in (3, 4))
    reg = ModelRegistry(r.registry)
    champ = r.champion
    assert reg.aliases(champ["name"]).get("champion") == champ["version"]
    assert champ["name"].endswith("-finetuned" if promoted == "finetuned" else "-probe")
    report = Path(r.report).read_text()
    assert f"# Transfer decision: case {case}" in report and "## Similarity" in report
    assert f"**{promoted}** is the champion" in report and "## How to override" in report
    if r.finetuned is not None:  # the case sets the freezing; the optimizer asked for is kept
        config = reg.record(r.finetuned["name"], r.finetuned["version"]).metadata["config"]
        assert config["optimizer"] == "adam"
        # case 4 trains everything; case 3 freezes up to the end of the stride-16 stage (top_freeze_for)
        assert config["freeze"] == "none" if case == 4 else config["freeze"].startswith("until:block_")
    if case == 4:
        adaptation = r.finetuned["metrics"]["test"]["adaptation"]
        assert adaptation["adapted_groups"] == {} and adaptation["kept_groups"] == {"(test)": 6}
        assert "AdaBN" in report and "test: 0 group(s) adapted, 1 kept the trained statistics" in report
    if case == 1:
        assert r.decision["probe_layer"] == "out_relu"  # case 1 probes the last layer
    if "case" in kwargs:
        assert f"Case {case} was forced" in report


def test_no_selection_step_reads_the_test_rows(tmp_path):
    """Poison the store's test rows (features replaced by large noise): the layer sweep, the similarity
    decision and the probe's C search and weights stay exactly the same; only the test metrics move."""
    import shutil

    import h5py
    import numpy as np

    from flows.sweep import SWEEP_PROBE
    from storage import ModelRegistry
    from tasks.probe import evaluate_probe, fit_probe
    from tasks.probe.linear import LinearConfig
    from tasks.probe.train import sweep_layers
    from test_linear import make_store

    clean = make_store(tmp_path / "clean.h5")
    poisoned = tmp_path / "poisoned.h5"
    shutil.copy(clean, poisoned)
    rng = np.random.default_rng(7)
    with h5py.File(poisoned, "r+") as f:
        for layer in ("signal", "noise"):
            g = f[layer]["avg"]
            test = np.flatnonzero(g["split"][:].astype(str) == "test")
            assert len(test) >= 20
            feats = g["features"][:]
            feats[test] = rng.normal(0, 1000, feats[test].shape)
            g["features"][:] = feats

    seen = {}
    for name, store in (("clean", clean), ("poisoned", poisoned)):
        sweep = sweep_layers(store, None, SWEEP_PROBE, tmp_path / name)
        sim = tr.measure_similarity(sweep["rows"], "signal", 0.02, pretrained=True)
        size = tr.SizeMeasure(80, {"a": 27}, 27, 27, False, 500)
        reg = tmp_path / name / "reg"
        trained = fit_probe(store, "signal", "avg", LinearConfig(n_jobs=1), reg, name="p")
        model, _ = ModelRegistry(reg).load("p", 1)
        metrics = evaluate_probe(reg, "p", 1, store, report_dir=tmp_path / name)["metrics"]
        seen[name] = {"rows": [(r["layer"], r["mean"], r["std"]) for r in sweep["rows"]],
                      "decision": (tr.decide(size, sim).case, tr.decide(size, sim).probe_layer),
                      "C": trained["C"], "cv": trained["cv_scores"], "coef": model[-1].coef_.copy(),
                      "val": metrics["val"]["accuracy"], "test": metrics["test"]["accuracy"]}
    a, b = seen["clean"], seen["poisoned"]
    assert a["rows"] == b["rows"] and a["decision"] == b["decision"] and a["C"] == b["C"] and a["cv"] == b["cv"]
    assert np.array_equal(a["coef"], b["coef"]) and a["val"] == b["val"]
    assert a["test"] > b["test"] + 0.1, (a["test"], b["test"])  # the poison reached the rows that decide


@pytest.mark.slow
def test_fine_tuning_never_shows_test_images_to_training_or_early_stopping(tmp_path, texture_data, small_cnn,
                                                                            monkeypatch):
    """Every dataset fine-tuning builds (training, and val for early stopping and the best checkpoint)
    holds train or val images only; without a val split it refuses rather than watch test."""
    from storage.errors import DatasetError
    from tasks.data.datasets import scan_dataset
    from tasks.finetune import fine_tune, training

    built: list[str] = []
    real = training.make_dataset

    def spy(paths, *args, **kwargs):
        built.extend(paths)
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(training, "make_dataset", spy)
    m = scan_dataset(texture_data, seed=2)
    split_of = {m.abspath(s): s.split for s in m.samples}
    spec = BackboneSpec(name=small_cnn, weights="file", preprocessing="scale01")
    cfg = FineTuneConfig(dense=[8], dropout=0.0, batch_size=8, augment=[], epochs=1)
    fine_tune(m, spec, cfg, tmp_path / "run")
    assert built and {split_of[p] for p in built} == {"train", "val"}
    no_val = scan_dataset(texture_data, val_fraction=0.0, seed=2)
    with pytest.raises(DatasetError, match="val split for early stopping"):
        fine_tune(no_val, spec, cfg, tmp_path / "run2")
