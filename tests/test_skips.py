"""With CI=true a skip fails the run unless the test carries an expected mark (conftest.EXPECTED_SKIP_MARKS)."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT

PLUGIN = '''
import pytest

def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.skip(reason="pretend the data is missing"))
'''


def _run(tmp_path, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "skip_everything.py").write_text(PLUGIN)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "skip_everything", "-p", "no:cacheprovider",
                           "tests/test_evidence.py::test_mcnemar_exact_is_the_two_sided_binomial_tail",
                           "tests/test_gpu.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_an_unexpected_skip_fails_the_run_in_ci_only(tmp_path):
    ci = _run(tmp_path, "true")
    assert ci.returncode == 1, ci.stdout[-2000:]
    said = ci.stdout.split("CI=true:")[1].split("=====")[0]
    assert "1 test(s) skipped" in said and "pretend the data is missing" in said
    assert "test_evidence.py::test_mcnemar_exact_is_the_two_sided_binomial_tail" in said
    assert "test_gpu.py" not in said  # GPU tests may skip: they are marked gpu
    here = _run(tmp_path, None)
    assert here.returncode == 0 and "CI=true" not in here.stdout, here.stdout[-2000:]
