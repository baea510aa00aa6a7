"""Shared fixtures. Nothing here downloads anything: data is generated, backbones use random weights
unless ../shared/keras is present (those tests skip otherwise)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("CNNCODES_PROGRESS", "0")
# Keras reads KERAS_HOME once, when it is imported: point it at the shared weights (read-only) before that.
if (SHARED / "keras" / "models").is_dir():
    os.environ.setdefault("KERAS_HOME", str(SHARED / "keras"))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The tiny backbone of the suite: MobileNetV2 alpha 0.35 at 96 px, random (seeded) weights.
TINY = dict(name="mobilenet_v2", weights="none", input_size=96, backbone_args={"alpha": 0.35})
TINY_LAST = "out_relu"
TINY_EARLY = "block_3_expand_relu"


@pytest.fixture(scope="session", autouse=True)
def _isolated_homes(tmp_path_factory):
    """Prefect's database and result storage in a temporary folder, never the user's."""
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(home / "results")
    yield


@pytest.fixture(scope="session")
def small_cnn(tmp_path_factory):
    """A 6-layer CNN with BatchNormalization saved as .keras (a user's own model file): healthy gradients
    (a randomly initialised MobileNet's vanish), 32 px, float32, trains in a second."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 3))
    x = inp
    for i, (f, s) in enumerate([(8, 1), (16, 2), (16, 2)]):
        x = keras.layers.Conv2D(f, 3, strides=s, padding="same", name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    path = tmp_path_factory.mktemp("cnn") / "small.keras"
    keras.Model(inp, x).save(path)
    return str(path)


def _gpu_visible() -> bool:
    from tasks import runtime

    return runtime.gpu_hardware_present() and bool(runtime.gpus())


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where the Keras backend sees a GPU (benchmarks/gpu.sh runs them there)."""
    marked = [item for item in items if "gpu" in item.keywords]
    if marked and not _gpu_visible():
        skip = pytest.mark.skip(reason="needs a GPU that the Keras backend sees (run benchmarks/gpu.sh on a GPU machine)")
        for item in marked:
            item.add_marker(skip)


# With CI=true a skipped test fails the run, unless it carries one of these marks: in CI, green means that
# every other test ran (a missing file, tool or permission cannot pass as a skip).
EXPECTED_SKIP_MARKS = ("gpu",)  # no GPU in CI: benchmarks/gpu.sh runs these on a GPU machine
_UNEXPECTED_SKIPS: list[str] = []


def unexpected_skip(report) -> bool:
    """A skipped test or setup that no mark of :data:`EXPECTED_SKIP_MARKS` excuses."""
    return report.skipped and not any(mark in report.keywords for mark in EXPECTED_SKIP_MARKS)


def pytest_runtest_logreport(report):
    if os.environ.get("CI", "").lower() == "true" and unexpected_skip(report):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _UNEXPECTED_SKIPS.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if _UNEXPECTED_SKIPS:
        session.config.get_terminal_writer().line(
            f"\nCI=true: {len(_UNEXPECTED_SKIPS)} test(s) skipped that CI must run (only tests marked "
            f"{', '.join(EXPECTED_SKIP_MARKS)} may skip here):\n  " + "\n  ".join(_UNEXPECTED_SKIPS), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def tiny_spec():
    from tasks.backbones import BackboneSpec

    return BackboneSpec(**TINY)


@pytest.fixture
def texture_data(tmp_path):
    """A 3-class folder dataset of small generated JPEGs (12 per class)."""
    from tasks.data.synthetic import make_dataset

    return make_dataset(tmp_path / "data", per_class=12, size=(48, 56), seed=1)


@pytest.fixture
def oriented_data(tmp_path):
    """A 3-class train/val/test folder dataset that a small CNN can learn in seconds: 32 px PNG stripes
    whose orientation (horizontal, vertical, diagonal) is the class, colours and period random; 30 train,
    10 val and 15 test images per class."""
    from tasks.data.synthetic import make_oriented_dataset

    return make_oriented_dataset(tmp_path / "oriented", splits={"train": 30, "val": 10, "test": 15}, size=32,
                                 seed=0)


def shared_path(*parts: str) -> Path:
    return SHARED.joinpath(*parts)


def require_shared(*parts: str) -> Path:
    p = shared_path(*parts)
    if not p.exists():
        if os.environ.get("CNNCODES_REQUIRE_SHARED"):  # set by .ci/run: CI must not pass by skipping them
            pytest.fail(f"{p} is absent but CNNCODES_REQUIRE_SHARED is set: the tests on real data cannot run")
        pytest.skip(f"{p} is absent (../shared test material is only on developer machines and CI)")
    return p
