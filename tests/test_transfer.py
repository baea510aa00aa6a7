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


def test_gate_promotes_and_refuses():
    probe = {"metrics": {"val": {"accuracy": 0.80}}}
    assert tr.gate({"metrics": {"val": {"accuracy": 0.85}}}, probe, 0.01)["promoted"] == "finetuned"
    refused = tr.gate({"metrics": {"val": {"accuracy": 0.805}}}, probe, 0.01)
    assert refused["promoted"] == "probe" and "does not beat it" in refused["reason"]
    assert tr.gate(None, probe, 0.01)["promoted"] == "probe"
    both_test = {"metrics": {"val": {"accuracy": 0.5}, "test": {"accuracy": 0.9}}}
    assert tr.gate(both_test, {"metrics": {"val": {"accuracy": 0.9}, "test": {"accuracy": 0.6}}}, 0.01)["split"] == "test"


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


TINY_FLOW = dict(backbone=BackboneSpec(name="mobilenet_v2", weights="none", input_size=96,
                                       backbone_args={"alpha": 0.35}),
                 finetune=FineTuneConfig(epochs=1, head_epochs=0, batch_size=8))


@pytest.mark.slow
@pytest.mark.parametrize("kwargs,case,promoted", [
    (dict(large_per_class=1000), 2, "probe"),                        # measured: small, random weights -> 2
    (dict(large_per_class=5, gate_margin=-1.0), 4, "finetuned"),     # measured: large -> 4; gate always promotes
    (dict(case=1), 1, "probe"),                                      # forced
    (dict(case=3, gate_margin=1.0), 3, "probe"),                     # forced; gate never promotes
])
def test_transfer_flow_routes_gates_and_reports(harness, tmp_path, texture_data, kwargs, case, promoted):
    from flows.transfer import transfer

    r = transfer(str(texture_data), thresholds=Thresholds(**kwargs), output=Output(out=str(tmp_path / "out")),
                 **TINY_FLOW)
    assert r["case"] == case and r["gate"]["promoted"] == promoted
    assert (r["finetuned"] is not None) == (case in (3, 4))
    reg = ModelRegistry(r["registry"])
    champ = r["champion"]
    assert reg.aliases(champ["name"]).get("champion") == champ["version"]
    assert champ["name"].endswith("-finetuned" if promoted == "finetuned" else "-probe")
    report = Path(r["report"]).read_text()
    assert f"# Transfer decision: case {case}" in report and "## Similarity" in report
    assert f"**{promoted}** is the champion" in report and "## How to override" in report
    if case == 1:
        assert r["decision"]["probe_layer"] == "out_relu"  # case 1 probes the last layer
    if "case" in kwargs:
        assert f"Case {case} was forced" in report
