"""Permission denied, as an unprivileged process meets it: a clear error or a reported skip that says what to do,
and nothing already written lost (issue 33). Tests run as root, which permissions do not stop: the cases run in a
process without root's power to override them (``setpriv``: no CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, TINY_LAST

CASES = r'''
import json, sys
from storage.errors import CnncodesError
from tasks.backbones import BackboneSpec
from tasks.data.datasets import scan_dataset
from tasks.extract import extract_to_store

base, spec, layer = sys.argv[1], BackboneSpec(**json.loads(sys.argv[2])), sys.argv[3]
out = {}

def attempt(name, fn):
    try:
        out[name] = {"ok": fn()}
    except CnncodesError as exc:  # the project's errors, each with what to do; anything else fails the test
        out[name] = {"error": type(exc).__name__, "message": str(exc)}

attempt("class_folder", lambda: [[s.path, s.reason] for s in scan_dataset(base + "/copy").skipped])
attempt("dataset_folder", lambda: len(scan_dataset(base + "/locked").samples))
m = scan_dataset(base + "/copy")
attempt("read_only_store", lambda: extract_to_store(m, base + "/store.h5", spec, [(layer, "avg")])["computed"])
attempt("read_only_folder", lambda: extract_to_store(m, base + "/shut/new.h5", spec, [(layer, "avg")])["computed"])
print(json.dumps(out))
'''

UNPRIVILEGED = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner",
                "--inh-caps=-dac_override,-dac_read_search,-fowner"]


def _unprivileged() -> list[str]:
    if os.geteuid() != 0:
        return []  # permissions stop this process already
    if shutil.which("setpriv") is None:
        pytest.fail("running as root without setpriv (util-linux): permissions cannot be tested here")
    return UNPRIVILEGED


@pytest.mark.slow  # builds a network twice
def test_permission_denied_is_a_clear_error_or_a_reported_skip_and_loses_nothing(tmp_path, texture_data, tiny_spec):
    from storage import FeatureStore
    from tasks.data.datasets import scan_dataset
    from tasks.extract import extract_to_store

    store = tmp_path / "store.h5"
    extract_to_store(scan_dataset(texture_data), store, tiny_spec, [(TINY_LAST, "avg")])
    before = FeatureStore(store).read(TINY_LAST, "avg")
    data = tmp_path / "copy"
    shutil.copytree(texture_data, data)
    shut_class = sorted(p for p in data.iterdir() if p.is_dir())[0]
    (tmp_path / "locked" / "a").mkdir(parents=True)
    (tmp_path / "shut").mkdir()
    for path, mode in ((shut_class, 0o000), (tmp_path / "locked", 0o000), (tmp_path / "shut", 0o555),
                       (store, 0o444)):
        path.chmod(mode)
    try:
        run = subprocess.run([*_unprivileged(), sys.executable, "-c", CASES, str(tmp_path), json.dumps(TINY),
                              TINY_LAST], cwd=ROOT, capture_output=True, text=True, timeout=600)
    finally:
        for path in (shut_class, tmp_path / "locked", tmp_path / "shut", store):
            path.chmod(0o755)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])

    skips = dict(got["class_folder"]["ok"])  # the folder it cannot list is reported, not "empty"
    reason = skips[shut_class.name + "/"]
    assert "cannot be listed (Permission denied)" in reason and "chmod a+rx" in reason, skips
    assert got["dataset_folder"]["error"] == "DatasetError"
    assert "cannot be listed (Permission denied)" in got["dataset_folder"]["message"]
    assert got["read_only_store"]["error"] == "StoreError"
    assert "write permission" in got["read_only_store"]["message"]
    assert got["read_only_folder"]["error"] == "StoreError"
    assert f"write permission on the folder {tmp_path / 'shut'}" in got["read_only_folder"]["message"]
    assert not list((tmp_path / "shut").iterdir())

    after = FeatureStore(store).read(TINY_LAST, "avg")  # nothing written is lost
    assert len(after) == len(before) == 36 and (after.features == before.features).all()


@pytest.mark.parametrize("code, words", [("ENOSPC", "The disk is full"), ("EACCES", "give the user running cnncodes"),
                                         ("EROFS", "read-only")])
def test_an_os_refusal_no_step_explains_is_said_with_what_to_do(monkeypatch, capsys, code, words):
    import errno

    from cnncodes import cli

    def refused(args):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), "/somewhere/file")

    monkeypatch.setitem(cli.COMMANDS, "backbones", refused)
    assert cli.main(["backbones", "--json"]) == cli.EXIT_USER_ERROR
    out, err = capsys.readouterr()
    assert words in err and "/somewhere/file" in err and "run the same command again" in err
    assert json.loads(out)["type"] in ("OSError", "PermissionError")  # (Python picks the subclass by errno)


def test_other_os_errors_keep_their_traceback(monkeypatch):
    import errno

    from cnncodes import cli

    def broken(args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setitem(cli.COMMANDS, "backbones", broken)
    with pytest.raises(OSError, match="Input/output"):
        cli.main(["backbones"])
