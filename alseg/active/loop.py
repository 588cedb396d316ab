"""The active-learning loop: initial training, then rounds of score -> select -> label -> retrain.

Owns the order of a run and its resumption. Every step's outcome is in the run's store before
the next starts, and each step is seeded from (seed, round, step), so a run resumed after a crash
or Ctrl-C redoes at most the interrupted step and chooses exactly the ids an uninterrupted run
with the same seed chooses:

* round 0: fit ``train.epochs`` epochs on the initial labelled set, evaluate on the test split;
* round r >= 1: load round r-1's model (its best checkpoint by validation Dice); score the pool
  with T MC-dropout passes; let the strategy choose expert and pseudo-label ids; compute the
  pseudo-labels (thresholded MC mean, saved to ``pseudo/round-RRR.npz``); commit scores,
  selection and label moves in one transaction; retrain for ``round_epochs`` (warm start unless
  disabled); evaluate on the test split; mark the round done.

Pseudo-labels are transient by default: recomputed each round from the current model, used for
that round's training only, never counted as expert labels, their images left in the pool (as
the CEAL code does). ``keep_pseudo`` moves them to the labelled set for good.

The loop stops at ``rounds``, when the expert-labelled share of the train split reaches
``budget``, or when the pool is empty.
"""
from __future__ import annotations

import dataclasses
import io
import time
from pathlib import Path

import numpy as np

from alseg.config import ExperimentConfig, config_from_dict
from alseg.data.splits import Split
from alseg.errors import AlsegError
from alseg.evaluate import score_model
from alseg.experiment import fitted_config, new_run_dir, open_run_data, prepare_data, record_split
from alseg.model import UNet
from alseg.active.annotators import Oracle, SimulatedOracle
from alseg.progress import SILENT, Reporter, batch_progress
from alseg.runtime import Normalizer, resolve_device, seed_everything
from alseg.store import RunStore, atomic_write_bytes, atomic_write_text
from alseg.active.strategies import make_strategy
from alseg.train import Checkpoint, fit
from alseg.active.uncertainty import mc_dropout


def _seed(seed: int, round: int, step: int) -> int:
    """An independent, reproducible seed for one step of one round."""
    return int(np.random.SeedSequence([seed, round, step]).generate_state(1)[0])


def _round_dir(store: RunStore, round: int) -> Path:
    return store.checkpoint_dir / f"round-{round:03d}"


def _pseudo_path(store: RunStore, round: int) -> Path:
    return store.run_dir / "pseudo" / f"round-{round:03d}.npz"


class ActiveRun:
    """One run directory being driven through its rounds."""

    def __init__(self, store: RunStore, config: ExperimentConfig, reporter: Reporter = SILENT):
        self.store, self.config, self.reporter = store, config, reporter
        self.data = open_run_data(store, config.data.cache_dir, reporter)
        self.split = Split.from_dict(store.get("split"))
        self.normalizer = Normalizer.from_dict(store.get("normalizer"))
        self.device = resolve_device(config.train.device)
        self.oracle: Oracle = SimulatedOracle(self.data)
        self.strategy = make_strategy(config.active.strategy, config.active.ceal)

    # --- state ----------------------------------------------------------------------------------
    def pool(self) -> list[str]:
        return self.store.sample_ids(split="train", state="pool")

    def expert_labelled(self) -> list[str]:
        return self.store.labelled_ids(origins=("initial", "expert"))

    def next_round(self) -> int:
        done = [r["round"] for r in self.store.rounds() if r["status"] == "done"]
        return max(done) + 1 if done else 0

    def stop_reason(self, round: int) -> str | None:
        a = self.config.active
        if round > a.rounds:
            return f"reached {a.rounds} rounds"
        if self.store.round_status(round) == "selected":
            return None  # its labels have moved already: finish it
        if not self.pool():
            return "the pool is empty"
        if a.budget is not None and len(self.expert_labelled()) >= a.budget * len(self.split.train):
            return f"reached the label budget ({a.budget:.0%} of {len(self.split.train)} training images)"
        return None

    # --- steps ----------------------------------------------------------------------------------
    def _load_model(self, round: int) -> Checkpoint:
        return Checkpoint.load(_round_dir(self.store, round) / "best.pt", device=self.device)

    def select(self, round: int) -> None:
        """Score the pool with round-1's model, choose, compute pseudo-labels, commit atomically."""
        a = self.config.active
        t0 = time.perf_counter()
        model = self._load_model(round - 1).model
        pool = self.pool()
        idx = self.data.indices(pool)
        mc_kw = dict(passes=a.mc_passes, batch_size=a.mc_batch_size, device=self.device, precision=a.mc_precision,
                     weighting=a.weighting)
        truth = self.data.masks if isinstance(self.oracle, SimulatedOracle) else None
        result = mc_dropout(model, self.data.images, idx, self.normalizer, seed=_seed(self.config.seed, round, 1),
                            masks=truth, reporter=self.reporter, **mc_kw)
        scored = time.perf_counter()
        rng = np.random.default_rng(_seed(self.config.seed, round, 2))
        sel = self.strategy.select(result.scores(), pool, round, rng)
        for text in sel.shortfalls:
            self.reporter.note(f"round {round}: {text}")
        if sel.pseudo_ids:
            pseudo = mc_dropout(model, self.data.images, self.data.indices(sel.pseudo_ids), self.normalizer,
                                seed=_seed(self.config.seed, round, 3), keep_maps=True, **mc_kw)
            buf = io.BytesIO()
            # ids and masks saved side by side, in one file, so a mask can never be paired with another image
            np.savez_compressed(buf, ids=np.array(sel.pseudo_ids), masks=(pseudo.mean > 0.5).astype(np.uint8))
            atomic_write_bytes(_pseudo_path(self.store, round), buf.getvalue())
        self.store.record_selection(round, pool, {**result.scores(), "dice": result.dice}, sel.expert_ids,
                                    sel.pseudo_ids, sel.reasons, sel.shortfalls, a.keep_pseudo)
        self.store.set(f"timings/{round}/select", {"score_s": scored - t0, "select_s": time.perf_counter() - scored})

    def pseudo_labels(self, round: int) -> tuple[list[str], np.ndarray]:
        """Pseudo-labelled ids and masks that train round ``round``."""
        ids: list[str] = []
        masks: list[np.ndarray] = []
        a = self.config.active
        for r in (range(1, round + 1) if a.keep_pseudo else [round]):
            path = _pseudo_path(self.store, r)
            if not path.is_file():  # round 0, or a round that drew no pseudo-labels
                continue
            with np.load(path) as f:
                ids.extend(str(i) for i in f["ids"])
                masks.append(f["masks"])
        size = self.data.size
        return ids, (np.concatenate(masks) if masks else np.zeros((0, size, size), np.uint8))

    def train(self, round: int) -> None:
        a, cfg = self.config.active, self.config
        t0 = time.perf_counter()
        expert = self.expert_labelled()
        pseudo_ids, pseudo_masks = self.pseudo_labels(round)
        images = np.concatenate([self.data.images[self.data.indices(expert)],
                                 self.data.images[self.data.indices(pseudo_ids)]])
        masks = np.concatenate([self.oracle.label(expert), pseudo_masks]).astype(np.uint8)
        seed_everything(_seed(cfg.seed, round, 4))
        if round > 0 and a.warm_start:
            model = self._load_model(round - 1).model
        else:
            model = UNet(cfg.model)
        val_idx = self.data.indices(self.split.val)
        phase = "initial" if round == 0 else "active"
        train_cfg = cfg.train if round == 0 else dataclasses.replace(cfg.train, epochs=a.round_epochs)
        result = fit(model, images, masks, self.data.images[val_idx], self.data.masks[val_idx], train_cfg,
                     self.normalizer, size=self.data.size, checkpoint_dir=_round_dir(self.store, round),
                     seed=_seed(cfg.seed, round, 5),
                     on_epoch=lambda r: (self.store.add_epoch(phase, round, r), self.reporter.epoch(phase, round, r)),
                     on_batch=batch_progress(self.reporter), checkpoint_meta={"round": round})
        trained = time.perf_counter()
        best = self._load_model(round)
        evaluation = score_model(best, self.data, self.data.indices(self.split.test), device=self.device,
                                 precision=cfg.train.precision)
        self.store.add_evaluation(round, "test", evaluation.summary)
        timings = {**self.store.get(f"timings/{round}/select", {}), "train_s": trained - t0,
                   "evaluate_s": time.perf_counter() - trained}
        # the pointer first: a crash before the round is marked done leaves it on a finished, evaluated model
        self.store.set("latest_checkpoint", f"checkpoints/round-{round:03d}/best.pt")
        pool_size = len(self.pool())
        row = {"round": round, "expert_labelled": len(expert), "pseudo_labelled": len(pseudo_ids), "pool": pool_size,
               "test": evaluation.summary, "val_dice": result["best_val_dice"], "seconds": sum(timings.values())}
        self.store.finish_round(round, expert_labelled=len(expert), pseudo_labelled=len(pseudo_ids), pool=pool_size,
                                test_dice=evaluation.summary["mean_dice"], val_dice=result["best_val_dice"],
                                seconds=row["seconds"], timings=timings)
        self.reporter.round(row)
        self.reporter.note(f"round {round}: {len(expert)} expert-labelled, {len(pseudo_ids)} pseudo-labelled, "
                           f"pool {pool_size}, test Dice {evaluation.summary['mean_dice']:.3f}")

    def run(self) -> str:
        """Drive the run to its stopping rule; return why it stopped."""
        while True:
            round = self.next_round()
            reason = self.stop_reason(round)
            if reason:
                self.store.set("stopped", reason)
                return reason
            if round > 0 and self.store.round_status(round) is None:
                self.select(round)
            self.train(round)


def start_run(config: ExperimentConfig, out: str | Path, reporter: Reporter = SILENT) -> Path:
    """Validate the data, create the run directory and record config, split and normalisation."""
    out = new_run_dir(out)
    make_strategy(config.active.strategy, config.active.ceal)  # fail early on a bad name
    prepared = prepare_data(config, reporter)
    config = fitted_config(config, prepared.data)
    for note in prepared.split.notes:
        reporter.note(note)
    reporter.note(f"effective config ({config.preset}):\n{config.to_yaml()}")
    labelled_idx = prepared.data.indices(prepared.split.labelled)
    with RunStore(out, create=True) as store:
        atomic_write_text(out / "config.yaml", config.to_yaml())
        store.set("config", config.to_dict())
        store.set("kind", "active")
        store.set("data", {"path": str(prepared.dataset.root), "format": prepared.dataset.format,
                           "size": prepared.data.size, "channels": prepared.data.channels,
                           "cache": str(prepared.data.path)})
        store.set("normalizer", Normalizer.fit(prepared.data.images[labelled_idx]).to_dict())
        record_split(store, prepared.split, prepared.split.labelled)
    return out


def run_active(config: ExperimentConfig | None = None, out: str | Path | None = None, *,
               resume: str | Path | None = None, rounds: int | None = None, budget: float | None = None,
               reporter: Reporter = SILENT) -> dict:
    """Start a run in ``out`` (or continue the one in ``resume``) and drive it to its stopping rule."""
    if resume is not None:
        run_dir = Path(resume)
        with RunStore(run_dir) as store:
            if store.get("kind") != "active":
                raise AlsegError("not an active-learning run (made by `alseg train`?)", run_dir)
            config = config_from_dict(store.get("config"))
    else:
        if config is None or out is None:
            raise AlsegError("a new run needs a config and an output folder")
        run_dir = start_run(config, out, reporter)
    if rounds is not None or budget is not None:
        config = dataclasses.replace(config, active=dataclasses.replace(
            config.active, rounds=config.active.rounds if rounds is None else rounds,
            budget=config.active.budget if budget is None else budget))
    with RunStore(run_dir) as store:
        store.set("config", config.to_dict())
        atomic_write_text(run_dir / "config.yaml", config.to_yaml())
        reason = ActiveRun(store, config, reporter).run()
    return {"run_dir": str(run_dir), "stopped": reason, **status(run_dir)}


def status(run_dir: str | Path) -> dict:
    """The finished rounds of a run, as ``alseg status --json`` prints them."""
    with RunStore(run_dir) as store:
        rows = []
        for r in store.rounds():
            if r["status"] != "done":
                continue
            expert_ids = (store.labelled_ids(origins=("initial",)) if r["round"] == 0
                          else store.selection(r["round"], "expert"))
            rows.append({"round": r["round"], "expert_labelled": r["expert_labelled"],
                         "pseudo_labelled": r["pseudo_labelled"], "pool": r["pool"], "test_dice": r["test_dice"],
                         "seconds": r["seconds"], "expert_ids": expert_ids})
        return {"rounds": rows, "stopped": store.get("stopped")}
