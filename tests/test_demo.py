"""`make demo`'s command: a complete CEAL run on the generated lesions, and the generator itself."""
import numpy as np
from PIL import Image

from alseg.data import open_dataset, summarize
from alseg.data.synthetic import make_synthetic
from conftest import run_json


def test_generated_lesions_are_deterministic_and_valid(tmp_path):
    a = make_synthetic(tmp_path / "a", n=12, size=32, seed=3)
    b = make_synthetic(tmp_path / "b", n=12, size=32, seed=3)
    for name in ("images/lesion_0005.png", "masks/lesion_0005.png"):
        assert np.array_equal(np.asarray(Image.open(a / name)), np.asarray(Image.open(b / name)))
    summary = summarize(open_dataset(a))
    assert summary == {"format": "folder", "samples": 12, "with_mask": 12, "positive": 12, "groups": 0,
                       "image_sizes": {"32x32": 12}}


def test_demo_runs_ceal_end_to_end(tmp_path):
    result = run_json("demo", "--out", tmp_path / "demo")
    rounds = result["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3] and result["stopped"] == "reached 3 rounds"
    # CEAL's 20 x round, capped at half the pool left after the expert's 35 (the demo's pool runs low)
    wanted = [0] + [min(20 * r["round"], (before["pool"] - 35) // 2) for before, r in zip(rounds, rounds[1:])]
    assert [r["pseudo_labelled"] for r in rounds] == wanted and wanted[:3] == [0, 20, 40] and wanted[3] < 60
    reasons = [r["gate"]["reason"] for r in rounds[1:]]
    assert all("passes the gate (0.50)" in t for t in reasons[:2])
    assert reasons[2].startswith(f"{wanted[3]} of 60 pseudo-labels: at most 50% of the")
    assert all(b["expert_labelled"] - a["expert_labelled"] == 35 for a, b in zip(rounds, rounds[1:]))
    # the generated lesions are easy: the model must segment them well by the last round
    assert rounds[-1]["test_dice"] > 0.8
