"""Hardening of runs: grey data, concurrent writers, damaged or read-only run folders, resume rules,
Ctrl-C and a full disk. Every failure is one line, ``alseg: error: FILE: PROBLEM``, exit 2."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alseg.data import open_dataset
from alseg.data.imageio import read_image, read_mask
from alseg.store import RunStore
from conftest import LGG, run_cli, run_json

TINY = ["--size", "32", "--width", "4", "--epochs", "2", "--round-epochs", "1", "--mc-passes", "3"]


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alseg: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def grey_lgg(tmp_path_factory):
    """The LGG tumour slices of 12 patients as 1-channel PNGs in the folder layout, grouped by patient."""
    root = tmp_path_factory.mktemp("grey") / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    patients = sorted({s.group for s in open_dataset(LGG).samples})[:12]
    rows = ["image,group"]
    for s in open_dataset(LGG).samples:
        if s.group not in patients:
            continue
        mask = read_mask(s.mask)
        if not mask.any():
            continue
        grey = read_image(s.image).mean(axis=2).round().astype(np.uint8)
        Image.fromarray(grey).save(root / "images" / f"{s.id}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{s.id}_mask.png")
        rows.append(f"{s.id}.png,{s.group}")
    (root / "groups.csv").write_text("\n".join(rows) + "\n")
    return root


def test_grey_dataset_runs_resumes_trains_and_compares(grey_lgg, tmp_path):
    out = tmp_path / "run"
    result = run_json("run", "--preset", "demo", "--data", grey_lgg, "--rounds", "1", "--out", out, *TINY)
    assert [r["round"] for r in result["rounds"]] == [0, 1]
    with RunStore.open_readonly(out) as store:
        assert store.config()["model"]["in_channels"] == 1 and store.data_info()["channels"] == 1
    assert "in_channels: 1" in (out / "config.yaml").read_text()
    resumed = run_json("run", "--resume", out, "--rounds", "2")
    assert [r["round"] for r in resumed["rounds"]] == [0, 1, 2]
    trained = run_json("train", "--preset", "demo", "--data", grey_lgg, "--out", tmp_path / "t", *TINY[:6])
    assert 0 <= trained["test"]["mean_dice"] <= 1
    compared = run_json("compare", "--preset", "demo", "--data", grey_lgg, "--strategies", "random", "--seeds", "1",
                        "--rounds", "1", "--out", tmp_path / "c", *TINY)
    assert compared["strategies"]["random"]["final_expert_labels"] > 0


def test_second_run_writer_is_refused(tmp_path):
    out = tmp_path / "run"
    args = ["--preset", "quick-lgg", "--data", str(LGG), *TINY, "--rounds", "3", "--round-epochs", "6"]
    first = subprocess.Popen([sys.executable, "-m", "alseg", "run", *args, "--out", str(out), "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "lock").is_file():
        time.sleep(0.1)
    while time.time() < deadline and str(first.pid) not in (out / "lock").read_text():
        time.sleep(0.1)
    second = run_cli("run", "--resume", out, check=False)
    line = _one_line_error(second, f"in use by process {first.pid} (alseg run)")
    assert str(out) in line
    finished = json.loads(first.communicate(timeout=600)[0])
    rounds = finished["rounds"]
    for before, after in zip(rounds, rounds[1:]):
        assert after["pool"] == before["pool"] - 35  # each round's pool counted once, by one writer


def test_groups_that_cannot_fill_the_splits_are_refused_before_anything_is_written(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    rows = ["image,group"]
    for k in range(12):
        img = np.full((16, 16, 3), 40 * (k % 5), np.uint8)
        mask = np.zeros((16, 16), np.uint8)
        mask[4:9, 4:9] = 255
        Image.fromarray(img).save(data / "images" / f"s{k}.png")
        Image.fromarray(mask).save(data / "masks" / f"s{k}.png")
        rows.append(f"s{k}.png,{'a' if k < 6 else 'b'}")
    (data / "groups.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    _one_line_error(run_cli("run", "--data", data, "--out", out, *TINY, check=False), "groups.csv",
                           "split would be empty", "2 group(s)")
    assert not out.exists()
    assert "split would be empty" in _one_line_error(run_cli("train", "--data", data, "--out", out, check=False))
    assert not out.exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A small finished run over a private copy of 8 LGG patients (so tests may damage it)."""
    root = tmp_path_factory.mktemp("own")
    data = root / "kaggle_3m"
    data.mkdir()
    for patient in sorted(p for p in LGG.iterdir() if p.is_dir())[:8]:
        shutil.copytree(patient, data / patient.name)
    out = root / "run"
    run_json("run", "--preset", "quick-lgg", "--data", data, "--rounds", "1", "--split-by", "sample", "--out", out,
             *TINY)
    return out, data


def _copy_run(finished_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run[0], out)
    return out


def test_a_validation_image_deleted_after_the_start_is_one_line_on_resume(finished_run, tmp_path):
    run, data = finished_run
    copy_data = tmp_path / "kaggle_3m"
    shutil.copytree(data, copy_data)
    out = _copy_run(finished_run, tmp_path)
    with RunStore.open_readonly(out) as store:
        val_id = store.split()["val"][0]
    con = sqlite3.connect(out / "run.db")  # point the copy at the copied data
    row = con.execute("SELECT value FROM meta WHERE key = 'data'").fetchone()
    con.execute("UPDATE meta SET value = ? WHERE key = 'data'", (row[0].replace(str(data), str(copy_data)),))
    con.commit()
    con.close()
    next(copy_data.rglob(f"{val_id}.tif")).unlink()
    next(copy_data.rglob(f"{val_id}_mask.tif")).unlink()
    _one_line_error(run_cli("run", "--resume", out, "--rounds", "2", check=False), "no longer holds 1 of the run's",
                    val_id, str(copy_data))


def test_resume_refuses_options_that_change_the_run(finished_run, tmp_path):
    out = _copy_run(finished_run, tmp_path)
    line = _one_line_error(run_cli("run", "--resume", out, "--size", "64", "--strategy", "random", "--width", "8",
                                   check=False), "--size", "--strategy", "--width", "only --rounds, --budget")
    assert str(out) in line
    before = (out / "run.db").read_bytes()
    for flag in (["--preset", "demo"], ["--data", str(LGG)], ["--epochs", "3"]):
        _one_line_error(run_cli("run", "--resume", out, *flag, check=False), flag[0])
    assert (out / "run.db").read_bytes() == before


@pytest.mark.parametrize("size", [0, 100, 4096, 30000])
def test_a_truncated_run_db_is_one_line_and_left_untouched(finished_run, tmp_path, size):
    out = _copy_run(finished_run, tmp_path)
    for extra in ("run.db-wal", "run.db-shm"):
        (out / extra).unlink(missing_ok=True)
    with open(out / "run.db", "r+b") as fh:
        fh.truncate(size)
    damaged = (out / "run.db").read_bytes()
    for args in (["status", out], ["report", out], ["run", "--resume", out], ["evaluate", out, "--data", LGG]):
        _one_line_error(run_cli(*args, check=False), "run.db")
    assert (out / "run.db").read_bytes() == damaged
    assert not (out / "report").exists()


@contextmanager
def read_only_view(folder: Path, tmp_path: Path):
    """``folder`` seen read-only: a read-only bind mount for root (who ignores permission bits), else chmod."""
    if os.geteuid() == 0:
        view = tmp_path / f"ro-{folder.name}"
        view.mkdir()
        subprocess.run(["mount", "--bind", str(folder), str(view)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True)
            yield view
        finally:
            subprocess.run(["umount", str(view)], check=True)
    else:
        paths = [folder, *folder.rglob("*")]
        for p in paths:
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        try:
            yield folder
        finally:
            for p in paths:
                p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_read_only_run_folder_serves_status_and_report_and_refuses_writers(finished_run, tmp_path):
    out = _copy_run(finished_run, tmp_path)
    expected = run_json("status", out)
    with read_only_view(out, tmp_path) as ro:
        assert not os.access(ro, os.W_OK)
        assert run_json("status", ro) == expected
        report = run_cli("report", ro, "--out", tmp_path / "elsewhere", "--json")
        assert Path(json.loads(report.stdout)["html"]).is_file()
        _one_line_error(run_cli("report", ro, check=False), "read-only")
        _one_line_error(run_cli("run", "--resume", ro, "--rounds", "2", check=False), "read-only")


def test_out_on_a_read_only_folder_is_one_line(tmp_path):
    parent = tmp_path / "parent"
    parent.mkdir()
    with read_only_view(parent, tmp_path) as ro:
        proc = run_cli("run", "--preset", "quick-lgg", "--data", LGG, "--out", ro / "run", *TINY, check=False)
        _one_line_error(proc, "read-only")
        assert not (ro / "run").exists()


def test_files_get_the_umask_mode(finished_run):
    out = finished_run[0]
    for path in [out / "config.yaml", *out.rglob("*.pt")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask(), path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_ctrl_c_says_how_to_resume(tmp_path):
    # 1000 epochs: the run must still be going when the signal comes, however slow the poll below
    out = tmp_path / "run"
    # the child gets Ctrl-C as a terminal's foreground job does: a suite started in the background of
    # a non-interactive shell (`make test &`) passes SIGINT on ignored, and alseg rightly keeps it so
    proc = subprocess.Popen([sys.executable, "-m", "alseg", "run", "--preset", "quick-lgg", "--data", str(LGG),
                             "--out", str(out), *TINY, "--epochs", "1000"], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            with sqlite3.connect(out / "run.db", timeout=1) as db:
                if db.execute("SELECT COUNT(*) FROM epochs").fetchone()[0] >= 1:
                    break
        except sqlite3.Error:
            pass
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    last = stderr.strip().splitlines()[-1]
    assert last == f"alseg: interrupted; resume with alseg run --resume {out}" and "Traceback" not in stderr


def test_disk_full_during_a_run_is_one_line_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    import alseg.store as store_module
    from alseg.cli import main

    real = store_module.atomic_write_bytes
    calls = {"n": 0}

    def full_on_the_third_checkpoint(path, data):
        if str(path).endswith(".pt"):
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(store_module, "atomic_write_bytes", full_on_the_third_checkpoint)
    out = tmp_path / "run"
    args = ["run", "--preset", "quick-lgg", "--data", str(LGG), "--out", str(out), "--rounds", "1", *TINY, "--json"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk full" in err[0] and f"alseg run --resume {out}" in err[0]
    monkeypatch.setattr(store_module, "atomic_write_bytes", real)
    assert main(["run", "--resume", str(out), "--json"]) == 0
    assert [r["round"] for r in json.loads(capsys.readouterr().out)["rounds"]] == [0, 1]


def test_report_with_a_damaged_checkpoint_writes_nothing(finished_run, tmp_path):
    out = _copy_run(finished_run, tmp_path)
    (out / "checkpoints" / "round-001" / "best.pt").write_bytes(b"not a checkpoint")
    _one_line_error(run_cli("report", out, check=False), "best.pt", "checkpoint")
    assert not (out / "report").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".report")]
