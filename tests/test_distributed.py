"""Several processes (torchrun, gloo on CPU): MC scores seeded per image, sharded scoring and DDP
training give what one process gives; only rank 0 writes."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alseg.active.uncertainty import mc_dropout
from alseg.data import load_cached, open_dataset
from alseg.model import ModelConfig, UNet
from alseg.runtime import Normalizer
from conftest import LGG, ROOT, UNGATED

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
WAIT_S = 300  # a hung collective fails the test instead of the suite


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=WAIT_S, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)
    assert proc.returncode == 0, "\n".join(l for l in proc.stderr.splitlines() if not l.startswith("W1"))[-4000:]
    return proc


@pytest.fixture(scope="module")
def lgg32(cache_dir):
    return load_cached(open_dataset(LGG), 32)


def test_scores_do_not_depend_on_batch_size_or_order(lgg32):
    torch.manual_seed(0)
    model = UNet(ModelConfig(width=4, depth=3, dropout=0.3))
    pool = np.arange(1, 61, 2)
    norm = Normalizer.fit(lgg32.images[pool])
    kw = dict(passes=4, seed=9, precision="fp32", keep_masks=True)
    a = mc_dropout(model, lgg32.images, pool, norm, batch_size=16, **kw)
    b = mc_dropout(model, lgg32.images, pool, norm, batch_size=3, **kw)
    c = mc_dropout(model, lgg32.images, pool[::-1], norm, batch_size=7, **kw)
    np.testing.assert_allclose(b.variance, a.variance, rtol=1e-4)
    np.testing.assert_allclose(c.variance[::-1], a.variance, rtol=1e-4)
    np.testing.assert_array_equal(c.packed_masks[::-1], a.packed_masks)
    other = mc_dropout(model, lgg32.images, pool, norm, batch_size=16, **{**kw, "seed": 10})
    assert np.abs(other.variance - a.variance).max() > 1e-3 * a.variance.max()  # the seed does matter


def test_two_gloo_processes_score_and_select_like_one(tmp_path, lgg32):
    script = ROOT / "tests" / "distributed_scoring.py"
    _run([sys.executable, script, LGG, tmp_path / "one.npz", 16])
    _run([*TORCHRUN, script, LGG, tmp_path / "two.npz", 5])  # another batch size too
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    for name in ("variance", "entropy", "bald", "dice", "foreground"):
        np.testing.assert_allclose(two[name], one[name], rtol=1e-4, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(two["packed"], one["packed"])
    assert list(two["expert"]) == list(one["expert"]) and len(one["expert"]) == 35
    assert list(two["pseudo"]) == list(one["pseudo"])


# One pass an epoch (--min-epoch-steps 0) and CEAL's pseudo-labels (UNGATED): a handful of steps on
# round 0's images and on round 1's expert and pseudo-labelled images.
ARGS = ["run", "--preset", "quick-lgg", "--data", str(LGG), "--rounds", "1", "--size", "32", "--width", "4",
        "--epochs", "2", "--round-epochs", "1", "--mc-passes", "3", "--seed", "4", "--min-epoch-steps", "0",
        "--config", str(UNGATED)]


def _epochs(out: Path) -> list[tuple]:
    with sqlite3.connect(out / "run.db") as db:
        return db.execute("SELECT phase, round, epoch, train_loss, val_dice FROM epochs ORDER BY round, epoch").fetchall()


def _files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and not p.name.startswith("run.db"))


def test_torchrun_alseg_run_trains_like_one_process_and_only_rank0_writes(tmp_path, lgg32):
    # with dropout: each batch row draws its masks from a generator seeded by (seed, row, step),
    # whichever rank trains it, so only float rounding of the gradient sum differs
    args = ARGS
    _run([sys.executable, "-m", "alseg", *args, "--out", tmp_path / "one"])
    _run([*TORCHRUN, "-m", "alseg", *args, "--out", tmp_path / "two"])
    one, two = _epochs(tmp_path / "one"), _epochs(tmp_path / "two")
    assert [r[:3] for r in two] == [r[:3] for r in one] == [("initial", 0, 1), ("initial", 0, 2), ("active", 1, 1)]
    # DDP averages the two ranks' gradients: the same batches, so the same losses up to float rounding
    np.testing.assert_allclose([r[3] for r in two], [r[3] for r in one], rtol=1e-4)
    np.testing.assert_allclose([r[4] for r in two], [r[4] for r in one], atol=2e-3)  # validation Dice
    assert _files(tmp_path / "two") == _files(tmp_path / "one")  # nothing from rank 1, nothing missing
    with sqlite3.connect(tmp_path / "one" / "run.db") as a, sqlite3.connect(tmp_path / "two" / "run.db") as b:
        query = "SELECT round, id, kind FROM selections ORDER BY round, id"
        assert a.execute(query).fetchall() == b.execute(query).fetchall()  # the same images chosen
    status = _run([sys.executable, "-m", "alseg", "status", tmp_path / "two", "--json"]).stdout
    assert '"round": 1' in status


def test_rank_shares_cover_the_batch_once_and_weights_average_to_one():
    from alseg.train import _rank_share

    xb, yb = torch.arange(5.0).view(5, 1, 1, 1), torch.zeros(5, 1, 1, 1)
    shares = [_rank_share(xb, yb, rank, 2) for rank in range(2)]
    assert sorted(float(v) for s in shares for v in s[0].flatten()) == [0, 1, 2, 3, 4]
    assert sum(s[2] for s in shares) / 2 == pytest.approx(1.0)  # DDP's mean of the ranks' weighted means
    # a batch smaller than the group: the rank without rows runs one with weight 0, so it still joins
    x_one, _, weight = _rank_share(xb[:1], yb[:1], 1, 2)
    assert len(x_one) == 1 and weight == 0.0
    x_all, y_all, weight = _rank_share(xb, yb, 0, 1)
    assert x_all is xb and y_all is yb and weight == 1.0  # one process: the whole batch


def test_a_rank_killed_inside_a_step_stops_the_group_and_the_run_resumes(tmp_path, lgg32):
    """Rank 0 dies after its first epoch record, while rank 1 is inside the same fit: torchrun ends
    the group (no hang), and one process resumes the run to its end."""
    out = tmp_path / "run"
    proc = subprocess.run([str(c) for c in [*TORCHRUN, "-m", "alseg", *ARGS, "--out", out]], capture_output=True,
                          text=True, timeout=WAIT_S, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "ALSEG_FAULT": "epoch@1"})
    assert proc.returncode != 0
    assert len(_epochs(out)) == 1
    _run([sys.executable, "-m", "alseg", "run", "--resume", out])
    assert [r[:3] for r in _epochs(out)] == [("initial", 0, 1), ("initial", 0, 2), ("active", 1, 1)]
