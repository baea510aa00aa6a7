"""Scale out: sharded extraction on a Dask cluster, and a Prefect server on PostgreSQL."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY_LAST
from storage import FeatureStore
from tasks.synthetic import make_image

pytestmark = pytest.mark.slow
TINY_FLOW = dict(backbone="mobilenet_v2", weights="none", input_size=96, backbone_args={"alpha": 0.35})


def _by_path(codes):
    order = np.argsort(codes.paths.astype(str))
    return codes.paths.astype(str)[order], codes.features[order], codes.labels[order]


def test_two_dask_workers_give_the_single_process_features_and_stay_incremental(tmp_path, texture_data):
    from prefect.testing.utilities import prefect_test_harness

    from flows.extract_features import extract_features

    with prefect_test_harness(server_startup_timeout=90):
        single = extract_features(str(texture_data), layers=[TINY_LAST], store=str(tmp_path / "single.h5"),
                                  out=str(tmp_path / "o1"), **TINY_FLOW)
        sharded = extract_features(str(texture_data), layers=[TINY_LAST], store=str(tmp_path / "sharded.h5"),
                                   out=str(tmp_path / "o2"), shards=2, workers=2, **TINY_FLOW)
        assert sharded["computed"] == single["computed"] == 36
        per_shard = {p["shard"]: p["computed"] for p in sharded["per_shard"]}
        assert set(per_shard) == {0, 1} and all(n > 0 for n in per_shard.values())  # both workers worked
        a, b = FeatureStore(tmp_path / "single.h5"), FeatureStore(tmp_path / "sharded.h5")
        assert type(b).__name__ == "ShardedStore" and len(b.shards) == 2
        pa, fa, la = _by_path(a.read(TINY_LAST, "avg"))
        pb, fb, lb = _by_path(b.read(TINY_LAST, "avg"))
        assert (pa == pb).all() and (la == lb).all()
        scale = float(np.abs(fa).max())
        np.testing.assert_allclose(fb, fa, rtol=1e-4, atol=1e-5 * scale)

        classes = sorted(p.name for p in texture_data.iterdir())
        for i in range(7):
            make_image("stripes", (50, 50), 900 + i).save(texture_data / classes[i % 3] / f"more_{i}.jpg")
        grown = extract_features(str(texture_data), layers=[TINY_LAST], store=str(tmp_path / "sharded.h5"),
                                 out=str(tmp_path / "o2"), shards=2, workers=2, **TINY_FLOW)
        assert grown["computed"] == 7 and grown["reused"] == 36       # only the new images, across both shards
        assert len(FeatureStore(tmp_path / "sharded.h5").read(TINY_LAST, "avg")) == 43
        again = extract_features(str(texture_data), layers=[TINY_LAST], store=str(tmp_path / "sharded.h5"),
                                 out=str(tmp_path / "o2"), shards=2, workers=2, **TINY_FLOW)
        assert again["up_to_date"] and again["computed"] == 0
