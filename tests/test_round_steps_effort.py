"""Equal optimiser steps per active round (``active.round_steps``) and the simulated expert's effort
per round (the ``effort`` round fact), issue 31. Tiny generated lesions at 32 px, width 4."""
import numpy as np
import pytest
import torch

import alseg.active.loop as loop_module
from alseg.active.loop import run_active, status
from alseg.config import build_config
from alseg.data import load_cached, open_dataset
from alseg.data.synthetic import make_synthetic
from alseg.errors import AlsegError
from alseg.model import ModelConfig, UNet
from alseg.rundir import RunDir
from alseg.runtime import Normalizer
from alseg.store import RunStore
from alseg.train import Checkpoint, TrainConfig, epoch_plan, epoch_steps, fit

EXPERT, PSEUDO, ROUND_EPOCHS, ROUND_STEPS = 4, 4, 2, 5


@pytest.fixture(scope="module")
def lesions(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("lesions") / "data", n=48, size=32, seed=5)


def _config(data, strategy, round_steps=ROUND_STEPS):
    return build_config("demo", overrides={
        "data": {"path": str(data), "size": 32}, "model": {"width": 4}, "train": {"epochs": 1},
        "active": {"strategy": strategy, "rounds": 2, "round_epochs": ROUND_EPOCHS, "round_steps": round_steps,
                   "mc_passes": 2, "batch_size": EXPERT,
                   "ceal": {"pseudo_gate": False, "pseudo_per_round": PSEUDO, "pseudo_max_pool_fraction": 1.0}}})


def _run(config, out, monkeypatch):
    """Run ``config`` to its end; return the training-set size and batches counted of each fit."""
    fits = []
    real_fit = loop_module.fit

    def counting_fit(model, images, *args, on_batch=None, **kw):
        fits.append({"images": len(images), "batches": 0})

        def count(step, steps):
            fits[-1]["batches"] += 1
            if on_batch:
                on_batch(step, steps)

        return real_fit(model, images, *args, on_batch=count, **kw)

    monkeypatch.setattr(loop_module, "fit", counting_fit)
    result = run_active(config, out)
    monkeypatch.setattr(loop_module, "fit", real_fit)
    return result, fits


def _recomputed_changes(out, data, round):
    """Pixels where round-1's model (dropout off, logits > 0) differs from the true masks of the
    round's expert batch: computed here with the model and numpy, not with the loop's helper."""
    with RunStore.open_readonly(out) as store:
        ids = store.selection(round, "expert")
    ckpt = Checkpoint.load(RunDir(out).checkpoint(round - 1))
    ckpt.model.eval()
    idx = data.indices(ids)
    with torch.no_grad():
        logits = ckpt.model(ckpt.normalizer(torch.from_numpy(np.ascontiguousarray(data.images[idx]))))
    head_start = logits[:, 0].numpy() > 0
    return len(ids), int(np.count_nonzero(head_start != (np.asarray(data.masks[idx]) > 0)))


def test_epoch_plan_spreads_a_fixed_step_count_over_the_epochs():
    assert epoch_plan(30, TrainConfig(epochs=3, batch_size=8)) == [4, 4, 4]
    assert epoch_plan(30, TrainConfig(epochs=3, batch_size=8, min_epoch_steps=6)) == [6, 6, 6]
    for n in (3, 30, 300):  # whatever the number of images, the floor included
        assert epoch_plan(n, TrainConfig(epochs=3, batch_size=8, min_epoch_steps=6, total_steps=7)) == [3, 2, 2]
    with pytest.raises(AlsegError, match="train.total_steps"):
        TrainConfig(epochs=3, total_steps=2)
    for bad in (0, 1, 1.5, True):
        with pytest.raises(AlsegError, match="active.round_steps"):
            build_config("demo", overrides={"active": {"round_epochs": 2, "round_steps": bad}})
    assert build_config("demo", overrides={"active": {"round_epochs": 2, "round_steps": 2}}).active.round_steps == 2


@pytest.mark.parametrize("n", [3, 40])
def test_fit_takes_total_steps_whatever_the_set_size(n):
    """3 images (batches drawn from repeated shuffles) and 40 (fewer batches than one pass of 5)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, 16, 16, 1), dtype=np.uint8)
    masks = (rng.random((n, 16, 16)) > 0.5).astype(np.uint8)
    calls = []
    result = fit(UNet(ModelConfig(width=4, depth=3, in_channels=1)), images, masks, None, None,
                 TrainConfig(epochs=2, batch_size=8, total_steps=5, augment=False), Normalizer((0.5,), (0.25,)),
                 size=16, on_batch=lambda step, steps: calls.append((step, steps)))
    assert len(calls) == result["steps"] == 5
    assert [r["steps"] for r in result["history"]] == [3, 2]
    assert calls == [(1, 3), (2, 3), (3, 3), (1, 2), (2, 2)]


def test_round_steps_gives_every_round_the_same_steps(lesions, tmp_path, monkeypatch):
    result, fits = _run(_config(lesions, "ceal"), tmp_path / "run", monkeypatch)
    rounds = result["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert [r["pseudo_labelled"] for r in rounds] == [0, PSEUDO, 2 * PSEUDO]
    sizes = [f["images"] for f in fits]
    assert sizes[1:] == [rounds[1]["expert_labelled"] + PSEUDO, rounds[2]["expert_labelled"] + 2 * PSEUDO]
    # the two active rounds' sets differ enough that one pass an epoch would differ in steps ...
    per_pass = [ROUND_EPOCHS * epoch_steps(n, TrainConfig(batch_size=8)) for n in sizes[1:]]
    assert per_pass[0] != per_pass[1]
    # ... but both took round_steps, counted batch by batch and recorded; round 0 is unchanged
    assert [f["batches"] for f in fits[1:]] == [ROUND_STEPS, ROUND_STEPS]
    assert [r["train_steps"] for r in rounds] == [epoch_steps(sizes[0], TrainConfig(batch_size=8)),
                                                  ROUND_STEPS, ROUND_STEPS]
    assert fits[0]["batches"] == rounds[0]["train_steps"]
    # and the threads each round trained in, which decide its float path, are on record
    assert [r["threads"] for r in status(tmp_path / "run")["rounds"]] == [torch.get_num_threads()] * 3


def test_without_round_steps_rounds_take_one_pass_an_epoch(lesions, tmp_path, monkeypatch):
    result, fits = _run(_config(lesions, "random", round_steps=None), tmp_path / "run", monkeypatch)
    steps = [ROUND_EPOCHS * epoch_steps(f["images"], TrainConfig(batch_size=8)) for f in fits[1:]]
    assert [f["batches"] for f in fits[1:]] == steps == [r["train_steps"] for r in result["rounds"][1:]]


@pytest.mark.parametrize("strategy", ["ceal", "random"])
def test_effort_fact_is_the_pixels_changed_in_the_head_start(lesions, tmp_path, monkeypatch, strategy):
    if strategy == "random":  # the effort needs no MC scores
        def no_scoring(*args, **kwargs):
            raise AssertionError("random scored the pool")

        monkeypatch.setattr(loop_module, "mc_dropout", no_scoring)
    out = tmp_path / "run"
    result, _ = _run(_config(lesions, strategy), out, monkeypatch)
    data = load_cached(open_dataset(lesions), 32)
    assert result["rounds"][0]["effort"] is None  # round 0: the initial labels, no head start
    with RunStore.open_readonly(out) as store:
        facts = store.round_facts()
    assert "effort" not in facts[0]
    changed_any = 0
    for r in (1, 2):
        n, changed = _recomputed_changes(out, data, r)
        fact = facts[r]["effort"]
        assert n == EXPERT
        assert fact == {"images": EXPERT, "pixels": EXPERT * 32 * 32, "pixels_changed": changed,
                        "changed_fraction": changed / (EXPERT * 32 * 32), "prediction": "deterministic"}
        assert result["rounds"][r]["effort"] == fact  # what `alseg status --json` shows per round
        changed_any += changed
    assert changed_any > 0  # a 1-epoch width-4 model does not segment the lesions perfectly
    assert status(out)["rounds"][1]["effort"] == facts[1]["effort"]


def test_effort_pass_changes_no_selection(lesions, tmp_path, monkeypatch):
    """The same seed with and without the effort pass: the same expert and pseudo-label ids each
    round, the same scores (round 2's depend on round 1's training, so on every seeded stream)."""
    with_effort, _ = _run(_config(lesions, "ceal"), tmp_path / "with", monkeypatch)
    monkeypatch.setattr(loop_module.ActiveRun, "simulated_effort", lambda self, model, ids: None)
    without, _ = _run(_config(lesions, "ceal"), tmp_path / "without", monkeypatch)
    with RunStore.open_readonly(tmp_path / "with") as a, RunStore.open_readonly(tmp_path / "without") as b:
        for r in (1, 2):
            assert a.selection(r, "expert") == b.selection(r, "expert")
            assert a.selection(r, "pseudo") == b.selection(r, "pseudo")
            assert a.scores(r) == b.scores(r)
        assert a.round_facts()[1]["effort"]["images"] == EXPERT and b.round_facts()[1]["effort"] is None
    assert [r["test_dice"] for r in with_effort["rounds"]] == [r["test_dice"] for r in without["rounds"]]
