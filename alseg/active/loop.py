"""The active-learning loop: a run or project directory driven through its durable steps.

A round is: score the pool with the previous round's model -> select -> queue the expert ids
(**awaiting labels**) -> the annotator's masks arrive (**labelled**) -> train -> evaluate
(**done**). Each step commits before the next starts and each is seeded from (seed, round, step),
so a run resumed after a crash or Ctrl-C redoes at most the interrupted step and chooses exactly
the ids an uninterrupted run with the same seed chooses. The simulated annotator answers at
once, so ``alseg run`` walks through every state without stopping; with a person (a project) the
loop exports the batch and stops at *awaiting labels* until ``alseg ingest`` or the review page
has stored every mask. Both are the same code.

* round 0: train ``train.epochs`` epochs on the initial labelled set (a project without masks
  first queues a random initial batch, spread over groups, of a volume's slices only those
  that are not mostly air), evaluate;
* round r >= 1: score the pool with T MC-dropout passes (not for a strategy that needs no
  scores: ``random``); the strategy chooses expert and
  pseudo-label ids; the pseudo-labels (thresholded MC mean) are saved; scores, selection and the
  queue are one transaction; masks arrive; retrain for ``round_epochs`` (warm start unless
  disabled); evaluate on the test split (when there is one); mark the round done.

Pseudo-labels are transient by default: recomputed each round, used for that round's training
only, never counted as expert labels, their images left in the pool (as the CEAL code does).
``keep_pseudo`` moves them to the labelled set for good. An expert label exists once its mask
is in the store; training reads expert masks from the store and initial ones from the dataset.

The loop stops at ``rounds``, when the expert-labelled share of the train split reaches
``budget``, or when the pool is empty.
"""
from __future__ import annotations

import dataclasses
import io
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from alseg.active.annotators import make_annotator
from alseg.active.coldstart import cover_selection, spread_selection, tissue_candidates
from alseg.active.gate import ModelHealth, model_health, pseudo_gate
from alseg.active.strategies import make_strategy
from alseg.active.uncertainty import bottleneck_features, mc_dropout
from alseg.active.volumes import apply_volume_rules, check_volume_rules
from alseg.config import ExperimentConfig, config_from_dict
from alseg.data.cache import mask_to_size
from alseg.data.sources import SLICED_LAYOUTS
from alseg.data.splits import Split, carve_validation
from alseg.errors import AlsegError
from alseg.faults import point
from alseg.evaluate import headline_metric, run_headline, score_model, validation_volumes, voxel_ml_by_volume, with_headline
from alseg.rundata import data_record, fitted_config, open_run_data, prepare_data, sample_rows
from alseg.model import UNet
from alseg.pretrain import load_into, pretrain
from alseg.progress import SILENT, Reporter, batch_progress, staged
from alseg.rundir import RunDir
from alseg.runtime import Normalizer, resolve_device, seed_everything, step_seed
from alseg.store import RunStore, atomic_write_bytes, atomic_write_text
from alseg.train import Checkpoint, fit, predict_probs

AWAITING = "awaiting labels"


class ActiveRun:
    """One run or project directory being driven through its rounds (the caller holds its lock)."""

    def __init__(self, store: RunStore, config: ExperimentConfig, reporter: Reporter = SILENT):
        self.store, self.config, self.reporter = store, config, reporter
        self.dir = store.dir
        prepared = open_run_data(store, config.data.cache_dir, reporter)
        self.dataset, self.data = prepared.dataset, prepared.data
        self.device = resolve_device(config.train.device)
        self.annotator = make_annotator(store.annotator(), self.data)
        self.strategy = make_strategy(config.active.strategy, config.active.ceal, config.active.batch_size)
        self.group_of = dict(zip(self.data.ids, self.data.groups))

    @property
    def split(self) -> Split:
        return Split.from_dict(self.store.split())

    @property
    def normalizer(self) -> Normalizer:
        return Normalizer.from_dict(self.store.normalizer())

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
        if self.store.round_status(round) is not None:
            return None  # selected already: finish it
        if round > a.rounds:
            return f"reached {a.rounds} rounds"
        if round == 0:
            return None
        if not self.pool():
            return "the pool is empty"
        train_size = len(self.split.train)
        if a.budget is not None and len(self.expert_labelled()) >= a.budget * train_size:
            return f"reached the label budget ({a.budget:.0%} of {train_size} training images)"
        return None

    # --- steps ----------------------------------------------------------------------------------
    def _load_model(self, round: int) -> Checkpoint:
        return Checkpoint.load(self.dir.checkpoint(round), device=self.device)

    def select_initial(self) -> None:
        """Round 0 of a project that starts without masks: a batch spread over groups, at random or
        covering the pool in the pre-trained features (``active.initial_selection``); of a volume's
        slices, only those that are not mostly air (:func:`~alseg.active.coldstart.tissue_candidates`)."""
        pool = self.pool()
        n = min(self.config.active.expert_batch, len(pool))
        if n < 2:
            raise AlsegError("a project needs at least 2 images in its pool to start without masks", self.dir.root)
        if self.dataset.format in SLICED_LAYOUTS:  # slices of volumes: not the mostly-air ones
            pool = tissue_candidates(self.data.images, pool, self.data.indices(pool),
                                     [self.group_of.get(i) for i in pool], n)
        groups = [self.group_of.get(i) for i in pool]
        rng = np.random.default_rng(step_seed(self.config.seed, 0, 2))
        if self.config.active.initial_selection == "cover":
            features = bottleneck_features(self.fresh_model(), self.data.images, self.data.indices(pool),
                                           self.normalizer, batch_size=self.config.active.mc_batch_size,
                                           device=self.device)
            picked = cover_selection(features, groups, n, rng)
            chosen = [pool[k] for k in sorted(picked)]
            self.store.open_initial_round(chosen, {i: "cover" for i in chosen})
            return
        chosen = spread_selection(pool, groups, n, rng)
        order = {i: k for k, i in enumerate(pool)}
        chosen.sort(key=order.__getitem__)
        self.store.open_initial_round(chosen, {i: "initial" for i in chosen})

    def select(self, round: int) -> None:
        """Score the pool with round-1's model, choose, save pseudo-labels, queue: one transaction."""
        a = self.config.active
        t0 = time.perf_counter()
        model = self._load_model(round - 1).model
        pool = self.pool()
        idx = self.data.indices(pool)
        mc_kw = dict(passes=a.mc_passes, batch_size=a.mc_batch_size, device=self.device, precision=a.mc_precision,
                     weighting=a.weighting)
        truth = self.data.masks if self.annotator.name == "simulated" else None
        inputs = {"group": np.array([self.group_of.get(i) for i in pool], dtype=object)}
        result = None
        if self.strategy.needs_scores:  # random does not: its rounds spent half their time scoring
            # keep_masks: the pseudo-labels are the thresholded MC means of this very pass, the one
            # that scored and selected them (a second pass would draw other dropout masks)
            result = mc_dropout(model, self.data.images, idx, self.normalizer,
                                seed=step_seed(self.config.seed, round, 1), masks=truth, reporter=self.reporter,
                                keep_masks=True, **mc_kw)
            inputs.update(result.scores())
        if self.strategy.needs_features:
            labelled = self.expert_labelled()
            inputs["features"] = bottleneck_features(model, self.data.images, idx, self.normalizer,
                                                     batch_size=a.mc_batch_size, device=self.device)
            inputs["labelled_features"] = bottleneck_features(model, self.data.images, self.data.indices(labelled),
                                                              self.normalizer, batch_size=a.mc_batch_size,
                                                              device=self.device)
        scored = time.perf_counter()
        rng = np.random.default_rng(step_seed(self.config.seed, round, 2))
        held = self.store.counts()["pseudo_labelled"] if a.keep_pseudo else 0
        gate = pseudo_gate(self.strategy.pseudo_wanted(round, held), self.health(round - 1),
                           len(pool) - min(a.expert_batch, len(pool)), min_val_dice=a.ceal.pseudo_min_val_dice,
                           max_pool_fraction=a.ceal.pseudo_max_pool_fraction, enabled=a.ceal.pseudo_gate)
        sel = self.strategy.select(inputs, pool, round, rng, pseudo_held=held, pseudo_limit=gate.limit)
        sel = self._across_volumes(sel, inputs, pool, rng)
        if gate.asked:
            self.reporter.note(f"round {round}: {gate.reason}")
        for text in sel.shortfalls:
            self.reporter.note(f"round {round}: {text}")
        if sel.pseudo_ids and result is None:
            raise AlsegError(f"strategy {self.strategy.name!r} chose pseudo-labels but needs no scores; "
                             "pseudo-labels are the scoring pass's MC means")
        if sel.pseudo_ids:
            position = {i: k for k, i in enumerate(pool)}
            buf = io.BytesIO()
            # ids and masks saved side by side, in one file, so a mask can never be paired with another image
            np.savez_compressed(buf, ids=np.array(sel.pseudo_ids),
                                masks=result.masks([position[i] for i in sel.pseudo_ids]))
            atomic_write_bytes(self.dir.pseudo(round), buf.getvalue())
            point("pseudo-saved")
        scores = None
        if result is not None:
            scores = {name: result.scores()[name] for name in ("variance", "entropy", "bald")}
            scores["dice"] = result.dice
        timings = {"score_s": scored - t0, "select_s": time.perf_counter() - scored}
        facts = {"gate": {**gate.to_dict(), "taken": len(sel.pseudo_ids)}}
        if truth is not None:
            facts["effort"] = self.simulated_effort(model, sel.expert_ids)
        self.store.record_selection(round, pool, scores, sel.expert_ids, sel.pseudo_ids, sel.reasons, sel.shortfalls,
                                    a.keep_pseudo, timings=timings, facts=facts)

    def simulated_effort(self, model: UNet, expert_ids: list[str]) -> dict:
        """What the simulated expert would change: the pixels where the head start (``model``'s
        deterministic prediction, dropout off, thresholded at 0.5, at working size) differs from the
        dataset's mask, over the ``expert_ids``. One forward pass over the batch; no random numbers,
        so the selection and every seeded stream stay as they were."""
        size = self.data.size
        pixels = len(expert_ids) * size * size
        changed = 0
        if expert_ids:
            idx = self.data.indices(expert_ids)
            head_start = predict_probs(model, np.asarray(self.data.images[idx]), self.normalizer, device=self.device,
                                       precision=self.config.train.precision,
                                       batch_size=self.config.active.mc_batch_size) > 0.5
            changed = int(np.count_nonzero(head_start != (np.asarray(self.data.masks[idx]) > 0)))
        return {"images": len(expert_ids), "pixels": pixels, "pixels_changed": changed,
                "changed_fraction": changed / pixels if pixels else None, "prediction": "deterministic"}

    def _across_volumes(self, sel, inputs: dict, pool: list[str], rng: np.random.Generator):
        """The strategy's expert ids under the volume rules (:mod:`alseg.active.volumes`); its
        pseudo-labels as they were."""
        a = self.config.active
        name = self.strategy.score_name
        position = dict(zip(self.dataset.ids, self.dataset.slice_indices())) if a.volume_selection == "volumes" else None
        choice = apply_volume_rules(sel.expert_ids, sel.reasons, pool, inputs["group"],
                                    inputs.get(name) if name else None, rng, mode=a.volume_selection,
                                    how=a.volume_score, cap=a.max_per_volume, exclude=sel.pseudo_ids,
                                    positions=position)
        pseudo_reasons = {i: sel.reasons[i] for i in sel.pseudo_ids if i in sel.reasons}
        return dataclasses.replace(sel, expert_ids=choice.expert_ids, reasons={**choice.reasons, **pseudo_reasons},
                                   shortfalls=[*sel.shortfalls, *choice.notes])

    def health(self, round: int) -> ModelHealth | None:
        """Round ``round``'s model against the constant masks on validation (None before it is trained)."""
        fact = self.store.round_facts().get(round, {}).get("model")
        if fact is not None:
            return ModelHealth.from_dict(fact)
        row = next((r for r in self.store.rounds() if r["round"] == round and r["status"] == "done"), None)
        if row is None:
            return None
        val = list(self.split.val)  # a run made before health was recorded: measured now, the same way
        return model_health(row["val_dice"] if val else None, self.training_masks(val) if val else None)

    def fresh_model(self) -> UNet:
        """An untrained U-Net, with the pre-trained encoder and decoder when ``pretrain.enabled``."""
        model = UNet(self.config.model)
        if self.config.pretrain.enabled:
            load_into(model, self.pretrained()["weights"])
        return model

    def pretrained(self) -> dict:
        """The pre-trained weights (:mod:`alseg.pretrain`): from the run directory, or trained now on
        the train and validation images (a project's: all of them; never the test split's); a killed
        pre-training resumes."""
        p, cfg = self.config.pretrain, self.config
        split = self.split
        keep = set(split.train) | set(split.val)
        ids = [i for i in self.data.ids if i in keep]
        with staged(self.reporter, "pre-train", p.steps(len(ids))) as advance:
            result = pretrain(self.data.images[self.data.indices(ids)], cfg.model, self.normalizer, p,
                              folder=self.dir.pretrain_dir, ids=ids, seed=step_seed(cfg.seed, 0, 8),
                              device=cfg.train.device, progress=advance)
        if not result["reused"]:
            self.reporter.note(f"pre-trained on {result['images']} images: {result['steps']} steps in "
                               f"{result['seconds']:.0f} s (reconstruction loss {result['loss']:.3f})")
        return result

    def answer(self, round: int) -> bool:
        """Let the annotator answer the queued batch; False when a person has still to label it."""
        if self.annotator.answers_at_once:
            self.store.store_masks(self.annotator.masks(self.store.queued(round)), source="simulated")
            return True
        from alseg.annotate.export import export_batch

        export_batch(self, round)
        return False

    def pseudo_labels(self, round: int) -> tuple[list[str], np.ndarray]:
        """Pseudo-labelled ids and masks that train round ``round``."""
        ids: list[str] = []
        masks: list[np.ndarray] = []
        a = self.config.active
        for r in (range(1, round + 1) if a.keep_pseudo else [round]):
            path = self.dir.pseudo(r)
            if not path.is_file():  # round 0, or a round that drew no pseudo-labels
                continue
            with np.load(path) as f:
                ids.extend(str(i) for i in f["ids"])
                masks.append(f["masks"])
        size = self.data.size
        return ids, (np.concatenate(masks) if masks else np.zeros((0, size, size), np.uint8))

    def training_masks(self, ids: list[str]) -> np.ndarray:
        """Working-size masks: the expert's from the store, the initial ones from the dataset."""
        origins = self.store.origins(ids)
        out = np.zeros((len(ids), self.data.size, self.data.size), np.uint8)
        from_data = [k for k, i in enumerate(ids) if origins[i] == "initial"]
        if from_data:
            out[from_data] = self.data.masks[self.data.indices([ids[k] for k in from_data])]
        for k, i in enumerate(ids):
            if origins[i] != "initial":
                mask = self.store.mask(i)
                if mask is None:
                    raise AlsegError(f"labelled id {i!r} has no stored mask", self.dir.db)
                out[k] = mask_to_size(mask, self.data.size)
        return out

    def _ensure_validation(self) -> None:
        """A project that started without masks takes its validation set from the first batch."""
        split = self.split
        if split.val:
            return
        labelled = self.expert_labelled()
        val = carve_validation(labelled, [self.group_of.get(i) for i in labelled], step_seed(self.config.seed, 0, 7))
        chosen = set(val)
        new = dataclasses.replace(split, train=tuple(i for i in split.train if i not in chosen), val=tuple(val))
        self.store.move_to_validation(val, new.to_dict())
        self.reporter.note(f"validation set: {len(val)} of the {len(labelled)} labelled images")

    def train(self, round: int) -> dict:
        a, cfg = self.config.active, self.config
        t0 = time.perf_counter()
        self._ensure_validation()
        split = self.split
        expert = self.expert_labelled()
        pseudo_ids, pseudo_masks = self.pseudo_labels(round)
        images = np.concatenate([self.data.images[self.data.indices(expert)],
                                 self.data.images[self.data.indices(pseudo_ids)]])
        masks = np.concatenate([self.training_masks(expert), pseudo_masks]).astype(np.uint8)
        seed_everything(step_seed(cfg.seed, round, 4))
        if round > 0 and a.warm_start:
            model = self._load_model(round - 1).model
        else:
            model = self.fresh_model()
        val_ids = list(split.val)
        val_images = self.data.images[self.data.indices(val_ids)]
        val_masks = self.training_masks(val_ids) if val_ids else None
        phase = "initial" if round == 0 else "active"
        # active.round_steps: the same optimiser steps every round, whatever the set's size (None: per epoch)
        train_cfg = cfg.train if round == 0 else dataclasses.replace(cfg.train, epochs=a.round_epochs,
                                                                     total_steps=a.round_steps)
        result = fit(model, images, masks, val_images, val_masks, train_cfg,
                     self.normalizer, size=self.data.size, checkpoint_dir=self.dir.checkpoint_dir(round),
                     seed=step_seed(cfg.seed, round, 5),
                     on_epoch=lambda r: (self.store.add_epoch(phase, round, r), self.reporter.epoch(phase, round, r),
                                         point("epoch")),
                     on_batch=batch_progress(self.reporter), checkpoint_meta={"round": round},
                     val_volumes=validation_volumes(self.dataset, self.data, split))
        trained = time.perf_counter()
        point("trained")
        test_dice, test_summary = None, {}
        if split.test:
            best = self._load_model(round)
            evaluation = score_model(best, self.data, self.data.indices(split.test), device=self.device,
                                     precision=cfg.train.precision, slice_index=self.dataset.slice_indices(),
                                     voxel_ml=voxel_ml_by_volume(self.dataset, self.data))
            # the headline (per-volume Dice for whole volumes) is what status, compare and the report show
            test_summary = with_headline(evaluation.summary,
                                         headline_metric(self.dataset.format, split.preset, split.split_by))
            self.store.add_evaluation(round, "test", test_summary)
            test_dice = test_summary["headline_dice"]
        timings = {**self.store.round_timings(round), "train_s": trained - t0,
                   "evaluate_s": time.perf_counter() - trained}
        pool_size = len(self.pool())
        val_dice = result["best_val_dice"] if val_ids else None
        health = model_health(val_dice, val_masks)
        row = {"round": round, "expert_labelled": len(expert), "pseudo_labelled": len(pseudo_ids), "pool": pool_size,
               "test": test_summary, "test_dice": test_dice, "val_dice": result["best_val_dice"],
               "seconds": sum(timings.values()), "model": health.to_dict(), "train_steps": result["steps"]}
        self.store.finish_round(round, expert_labelled=len(expert), pseudo_labelled=len(pseudo_ids), pool=pool_size,
                                test_dice=test_dice, val_dice=result["best_val_dice"], seconds=row["seconds"],
                                timings=timings, latest_checkpoint=self.dir.relative(self.dir.checkpoint(round)),
                                facts={"model": health.to_dict(), "train_steps": result["steps"],
                                       # the float path: a round trained in other threads is other bits
                                       "threads": torch.get_num_threads()})
        self.reporter.round(row)
        dice = "-" if test_dice is None else f"{test_dice:.3f}"
        val = "-" if result["best_val_dice"] is None else f"{result['best_val_dice']:.3f}"
        self.reporter.note(f"round {round}: {len(expert)} expert-labelled, {len(pseudo_ids)} pseudo-labelled, "
                           f"pool {pool_size}, validation Dice {val}, test Dice {dice}")
        if health.warning():
            self.reporter.note(f"warning: round {round}: {health.warning()}")
        return row

    def run(self) -> str:
        """Drive the run to its stopping rule, or to a batch awaiting a person; return why it stopped."""
        while True:
            round = self.next_round()
            if self.store.round_status(round) is None:
                reason = self.stop_reason(round)
                if reason:
                    self.store.set_stopped(reason)
                    return reason
                if round == 0 and not self.expert_labelled():
                    self.select_initial()
                elif round > 0:
                    self.select(round)
                point("selected")
            if self.store.round_status(round) == "awaiting" and not self.answer(round):
                return AWAITING
            point("labelled")
            self.train(round)
            point("round-done")


def start_run(config: ExperimentConfig, out: str | Path | RunDir, reporter: Reporter = SILENT, *,
              annotator: str = "simulated", pool: str = "split", notes: tuple[str, ...] = ()) -> RunDir:
    """Validate the data, create the run directory and record config, split and normalisation at once.

    ``out`` given as a :class:`RunDir` was checked by the caller (who may have put files in it).
    ``notes`` (the caller's, such as why a preset was chosen) are told once the data is valid, so
    bad input still ends in one line.
    """
    run_dir = out if isinstance(out, RunDir) else _new_or_unstarted(out)
    make_strategy(config.active.strategy, config.active.ceal, config.active.batch_size)  # fail early on a bad name
    check_volume_rules(config.active.volume_selection, config.active.volume_score, config.active.max_per_volume)
    make_annotator(annotator, None)
    prepared = prepare_data(config, reporter, pool=pool)
    config = fitted_config(config, prepared.data)  # channels decided from the data, recorded once
    split = prepared.split
    for note in (*notes, *split.notes):
        reporter.note(note)
    reporter.note(f"effective config ({config.preset}):\n{config.to_yaml()}")
    data = prepared.data
    # every training image's pixels, labelled or not (no mask needed): steadier than a lab's dozen
    # labelled images, and the same whatever is labelled, so pre-training does not depend on it
    normalizer = Normalizer.fit(data.images[data.indices(split.train)])
    with RunStore(run_dir, create=True) as store, run_dir.lock("run"):
        atomic_write_text(run_dir.config_file, config.to_yaml())
        point("created")  # killed here, the folder is reused by the same command (`_new_or_unstarted`)
        store.start(kind="active", annotator=annotator, config=config.to_dict(), data=data_record(prepared),
                    normalizer=normalizer.to_dict(), split=split.to_dict(), samples=sample_rows(split, split.labelled))
    return run_dir


def adopt_initial_round(run_dir: str | Path | RunDir, donor: str | Path | RunDir) -> bool:
    """Give a run the finished round 0 of ``donor`` when round 0 cannot differ between them.

    Round 0 (training on the initial labelled set, evaluation) depends on the data, split,
    normalisation, model, training settings and seed, never on the strategy or other ``active``
    settings, and it is seeded per step: a run that trained it itself would get the same weights,
    epochs and scores. ``alseg compare`` so trains round 0 once per seed instead of once per
    strategy. The checkpoints are copied first and the store records the round in one transaction
    afterwards, so a kill in between leaves a run that trains round 0 itself when resumed. Returns
    False, changing nothing, when the run has round 0 already, the donor has not finished it, or
    anything round 0 depends on differs.
    """
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir).require()
    donor = donor if isinstance(donor, RunDir) else RunDir(donor).require()
    with run_dir.lock("adopt round 0"), RunStore(run_dir) as store, RunStore.open_readonly(donor) as source:
        if store.round_status(0) is not None or source.round_status(0) != "done":
            return False

        def depends(s: RunStore) -> tuple:
            # read through the config classes, so a setting added since one of the two was stored
            # compares as its default, not as a difference
            config = {k: v for k, v in config_from_dict(s.config()).to_dict().items() if k != "active"}
            # not the cache folder: its name hashes file times, which change whenever the dataset is
            # copied again; a resumed run too reads the data by path, format, size and channels
            data = {k: v for k, v in s.data_info().items() if k != "cache"}
            return (config, s.split(), s.normalizer(), data, s.kind(), s.annotator(),
                    s.labelled_ids(origins=("initial",)), s.selection(0, "expert"))

        if not store.started() or depends(store) != depends(source):
            return False
        target = run_dir.checkpoint_dir(0)
        staging = target.with_name(target.name + ".adopting")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(donor.checkpoint_dir(0), staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        point("adopted-checkpoints")
        store.adopt_round(source, 0, run_dir.relative(run_dir.checkpoint(0)))
    return True


def _new_or_unstarted(out: str | Path) -> RunDir:
    """A fresh run directory, or one left by a run killed while it was being created (emptied again)."""
    try:
        return RunDir.check_new(out)
    except AlsegError:
        run_dir = RunDir(out)
        if not RunStore.never_started(run_dir):
            raise
        run_dir.empty("run")
        return run_dir


def open_active(store: RunStore) -> ExperimentConfig:
    """The recorded config of an active run or project, after checking that it finished starting."""
    if store.kind() != "active":
        raise AlsegError("not an active-learning run (made by `alseg train`?)", store.run_dir)
    if not store.started():
        raise AlsegError("the run was interrupted while it was being created; delete it and start again",
                         store.run_dir)
    return config_from_dict(store.config())


def extend(store: RunStore, config: ExperimentConfig, *, rounds: int | None = None,
           budget: float | None = None) -> ExperimentConfig:
    """The config with a new round limit or budget, recorded (the only changes a resume may make)."""
    if rounds is None and budget is None:
        return config
    config = dataclasses.replace(config, active=dataclasses.replace(
        config.active, rounds=config.active.rounds if rounds is None else rounds,
        budget=config.active.budget if budget is None else budget))
    store.set_config(config.to_dict())
    atomic_write_text(store.dir.config_file, config.to_yaml())
    return config


def run_active(config: ExperimentConfig | None = None, out: str | Path | None = None, *,
               resume: str | Path | None = None, rounds: int | None = None, budget: float | None = None,
               reporter: Reporter = SILENT, notes: tuple[str, ...] = ()) -> dict:
    """Start a run in ``out`` (or continue the one in ``resume``) and drive it to its stopping rule;
    ``notes`` are told once the data is valid (:func:`start_run`)."""
    if resume is not None:
        run_dir = RunDir(resume).require()
    else:
        if config is None or out is None:
            raise AlsegError("a new run needs a config and an output folder")
        run_dir = start_run(config, out, reporter, notes=notes)
    with run_dir.lock("run"), RunStore(run_dir) as store:
        config = extend(store, open_active(store), rounds=rounds, budget=budget)
        if store.annotator() != "simulated":
            raise AlsegError("this is a project labelled by a person: use `alseg query` and `alseg ingest`",
                             run_dir.root)
        reason = ActiveRun(store, config, reporter).run()
    return {"run_dir": str(run_dir.root), **status(run_dir.root), "stopped": reason}


def status(run_dir: str | Path) -> dict:
    """Label counts and the finished rounds of a run or project (read-only), as ``alseg status --json``.

    ``effort``: the expert's effort per round and selection reason (``rounds``) and over all (``totals``),
    as :meth:`RunStore.effort_by_round`; ``agreement``: second readings against the owners' masks.
    Each finished round of ``rounds`` carries its recorded facts: ``model`` (health), ``gate``,
    ``train_steps`` (optimiser steps it trained), ``threads`` (the CPU threads it trained in: runs
    made again in other threads take other float paths) and, for a simulated annotator's round >= 1,
    ``effort`` (:meth:`ActiveRun.simulated_effort`: the pixels the expert would change in the head
    start); None where not recorded."""
    with RunStore.open_readonly(run_dir) as store:
        seconds = store.expert_seconds()
        active = store.expert_active_seconds()
        facts = store.round_facts()
        rows = []
        for r in store.rounds():
            if r["status"] != "done":
                continue
            expert_ids = (store.labelled_ids(origins=("initial",)) if r["round"] == 0
                          else store.selection(r["round"], "expert"))
            if r["round"] == 0 and store.selection(0, "expert"):
                expert_ids = store.selection(0, "expert")
            rows.append({"round": r["round"], "expert_labelled": r["expert_labelled"],
                         "pseudo_labelled": r["pseudo_labelled"], "pool": r["pool"], "test_dice": r["test_dice"],
                         "val_dice": r["val_dice"], "seconds": r["seconds"],
                         "expert_seconds": seconds.get(r["round"], 0.0),
                         "expert_active_seconds": active.get(r["round"], 0.0), "expert_ids": expert_ids,
                         "model": facts.get(r["round"], {}).get("model"),
                         "gate": facts.get(r["round"], {}).get("gate"),
                         "train_steps": facts.get(r["round"], {}).get("train_steps"),
                         "threads": facts.get(r["round"], {}).get("threads"),
                         "effort": facts.get(r["round"], {}).get("effort")})
        open_round = next((r["round"] for r in store.rounds() if r["status"] == "awaiting"), None)
        model = rows[-1]["model"] if rows else None
        gate = facts.get(open_round, {}).get("gate") if open_round is not None else None
        effort = {"rounds": store.effort_by_round(), "totals": store.effort_totals()}
        return {**store.counts(), "annotator": store.annotator(), "open_round": open_round,
                "expert_seconds": sum(seconds.values()), "expert_active_seconds": sum(active.values()),
                "rounds": rows, "stopped": store.stopped(), "model": model,
                "warning": model["warning"] if model else None, "gate": gate, "effort": effort,
                "agreement": store.agreement(), "test_metric": run_headline(store)}
