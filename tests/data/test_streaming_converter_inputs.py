"""The shard converter (``python -m aa_lightning.data.prepare imagenet``) and the streamed reader on bad inputs
and faults (issue 22): an object-store ``--out`` is refused (item 10), one line for an empty class folder, for a
re-run into another source's conversion and for missing object-store credentials (item 15), the published
shards take the user's umask (item 16), a killed conversion leaves no worker process behind (item 17)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.cli_helpers import REPO, python_env
from helpers.streaming_helpers import write_tree

pytest.importorskip("litdata")

from aa_lightning.data.prepare import STAMP, convert_imagenet, main  # noqa: E402

CLASSES = ["n01", "n02"]


@pytest.fixture
def src(tmp_path) -> Path:
    write_tree(tmp_path / "imagenet", {"train": 2, "val": 1}, CLASSES, size=8)
    return tmp_path / "imagenet"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: "), err
    return err


@pytest.mark.parametrize("uri", ["s3://bucket/imagenet_litdata", "gs://bucket/x"])
def test_an_object_store_out_is_refused_and_nothing_is_written(src, tmp_path, monkeypatch, capsys, uri):
    monkeypatch.chdir(tmp_path)
    assert main(["imagenet", "--src", str(src), "--out", uri, "--workers", "1", "--quiet"]) == 2
    assert f"--out {uri}: a URI; convert to a local folder" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imagenet"]  # no ./s3: folder


def test_an_empty_class_folder_is_one_line_naming_it(src, capsys):
    (src / "train" / "n03").mkdir()
    (src / "val" / "n03").mkdir()
    (src / "val" / "n03" / "notes.txt").write_text("not an image")
    out = src.parent / "shards"
    assert main(["imagenet", "--src", str(src), "--out", str(out), "--workers", "1", "--quiet"]) == 2
    assert f"class folder {src / 'train' / 'n03'} holds no image" in one_error_line(capsys)
    assert not out.exists()


def test_a_rerun_into_the_conversion_of_another_source_says_the_sources_differ(src, tmp_path, capsys):
    out = tmp_path / "shards"
    convert_imagenet(src, out, num_workers=1, verbose=False)
    other = tmp_path / "other"
    write_tree(other, {"train": 1, "val": 1}, CLASSES, size=8)
    before = (out / STAMP).read_text()
    assert main(["imagenet", "--src", str(other), "--out", str(out), "--workers", "1", "--quiet"]) == 2
    line = one_error_line(capsys)
    assert f"--out {out} holds a finished conversion of another source ({src.resolve()})" in line
    assert f"the sources differ from --src {other.resolve()}" in line and "--overwrite" in line
    assert (out / STAMP).read_text() == before
    # the same source: nothing to do, as before
    assert main(["imagenet", "--src", str(src), "--out", str(out), "--workers", "1", "--quiet"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_missing_object_store_credentials_are_one_line_naming_the_uri(monkeypatch):
    from aa_lightning.data import StreamingImageNetDataModule
    from aa_lightning.data.streaming import ObjectStoreError

    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    uri = "s3://aa-lightning-no-such-bucket/imagenet_litdata"
    with pytest.raises(ObjectStoreError) as info:
        StreamingImageNetDataModule(data_dir=uri).setup("fit")
    message = str(info.value)
    assert "\n" not in message and len(message) < 600, message
    assert message.startswith(f"data.data_dir: cannot read {uri}/{STAMP}: no valid credentials for the object store")
    assert "AWS_ACCESS_KEY_ID" in message and "data.storage_options" in message


def test_the_published_shards_take_the_users_umask(src, tmp_path):
    previous = os.umask(0o022)
    try:
        convert_imagenet(src, tmp_path / "shards", num_workers=1, verbose=False)
    finally:
        os.umask(previous)
    modes = {
        str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode)
        for p in [tmp_path / "shards", *(tmp_path / "shards").rglob("*")]
    }
    assert modes["shards"] == 0o755  # mkdtemp's 0o700 before
    for name, mode in modes.items():
        assert mode == (0o755 if (tmp_path / name).is_dir() else 0o644), (name, oct(mode))


_SLOW_CONVERSION = """
import os, sys, time
import aa_lightning.data.prepare as prepare

real, pids = prepare._read_sample, sys.argv[3]

def slow(item, src):  # runs in litdata's worker processes
    open(os.path.join(pids, str(os.getpid())), "w").close()
    time.sleep(0.5)
    return real(item, src)

prepare._read_sample = slow
sys.exit(prepare.main(["imagenet", "--src", sys.argv[1], "--out", sys.argv[2], "--workers", "2", "--quiet"]))
"""


def _children(pid: int) -> set[int]:
    """The living descendants of ``pid`` (from /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_a_killed_conversion_leaves_no_worker_process(tmp_path):
    write_tree(tmp_path / "imagenet", {"train": 40, "val": 1}, CLASSES, size=8)  # 40 s of work per worker
    pids = tmp_path / "pids"
    pids.mkdir()
    script = tmp_path / "slow_conversion.py"
    script.write_text(_SLOW_CONVERSION)
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "imagenet"), str(tmp_path / "shards"), str(pids)],
        cwd=REPO,
        env=python_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while len(list(pids.iterdir())) < 2:  # both workers are reading
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the conversion's workers did not start"
            time.sleep(0.1)
        workers = _children(process.pid) | {int(p.name) for p in pids.iterdir()}
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in workers if _alive(pid)], "worker processes outlived the killed conversion"
    finally:
        for pid in workers:  # the test's own processes, if the check failed
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
