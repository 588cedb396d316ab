"""Comparing strategies: run (or reuse) one run per strategy and seed, plus full supervision, and
say with intervals over seeds whether a strategy saves expert labels.

Owns the layout of a comparison folder and its summary:

* ``OUT/runs/<strategy>-s<seed>/``: ordinary run directories (resumed when unfinished, reused
  when finished, so ``alseg compare`` resumes like ``alseg run``). Runs of one seed share the
  split, the initial labelled set and the initial model across strategies, so per-seed
  differences between strategies are paired; round 0 is trained once per seed, by the first
  strategy's run, and adopted by the others (:func:`alseg.active.loop.adopt_initial_round`);
* ``OUT/runs/full-s<seed>/``: with ``full``, supervised training on the whole train split with the
  same preset (the full-supervision reference; one copied from a study of other active-learning
  settings or initial epochs is reused, as it depends on neither: ``reuse_from`` copies them, and
  adopts each seed's round 0 from that study's runs);
* ``OUT/compare.png``: test Dice against expert labels, each strategy's mean over seeds with a
  band of its interval (:func:`interval_name`: the range of 2-3 seeds, a 95 % bootstrap interval
  over more), the full-supervision line and the paper's reported Dice; where the runs recorded
  the expert's effort, a second panel of test Dice against the megapixels changed;
* ``OUT/compare.json`` and ``OUT/compare.csv``: per strategy, over seeds (mean, 95 % interval and
  the per-seed values): the curve, the final test Dice, the area under the learning curve
  (:func:`aulc`), the expert labels needed to reach 95 % and 98 % of the seed's full-supervision
  Dice (:func:`labels_to_reach`, interpolated between rounds), the test Dice at 50 % labels and at
  fixed label counts, the labels counted with the validation masks (an expert drew those too), the
  effort curve and final pixels changed (:func:`cumulative_pixels_changed`), the pseudo-labels
  the runs trained on (the gate may take none, leaving an arm the same as its no-pseudo twin),
  and the paired per-seed differences against each baseline among the strategies (``random``,
  ``fg-random``: :data:`BASELINES`) with sign-flip p-values (:func:`paired_differences`,
  :func:`sign_flip_p`); the full-supervision references' best and last epochs (:func:`convergence`);
  with ``external``, the Dice of every run's final model on a second labelled dataset;
* ``OUT/external.json``: with ``external``, the external scores already computed, keyed by the
  dataset's path and each checkpoint's file, size and time, so a rerun does not score again.

"Test Dice" throughout is each run's headline (:func:`alseg.evaluate.headline_metric`): the mean
per-volume Dice (Buda et al.) when the test split holds whole volumes, else the mean Dice over
images. It is read from each run's recorded evaluations, the same for the active runs and the
full-supervision references; the summary names it (``metric``, ``metric_label``), and runs that
measure different headlines are refused rather than compared.

Studies made apart (machines or sessions that cannot share ``OUT``) with the same settings are
summarised as one by :func:`merge` from their ``compare.json`` files, which hold every run's curve.

The statistics are pure functions of :mod:`alseg.stats` and :func:`summarise` here;
:func:`compare` only runs, collects and writes.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from alseg.config import PAPER_DICE, ExperimentConfig, config_from_dict
from alseg.errors import AlsegError
from alseg.evaluate import HEADLINE_TEST_LABELS, headline_label, run_headline
from alseg.experiment import train_supervised
from alseg.active.loop import adopt_initial_round, run_active, start_run
from alseg.progress import SILENT, Reporter
from alseg.rundir import LOCK_NAME, RunDir
from alseg.store import RunStore, atomic_write_bytes, atomic_write_text
from alseg.active.strategies import strategy_names
from alseg.stats import (BOOTSTRAP_SEED, EXACT_FLIPS_UP_TO, LEVEL, MEGAPIXEL, MONTE_CARLO_FLIPS, RANGE_UP_TO,
                         RESAMPLES, aulc, bootstrap_interval, convergence, cumulative_pixels_changed,
                         default_fixed_counts, dice_at, interval_name, labels_to_reach, paired_differences,
                         seed_summary)

# The baselines every other strategy is paired against, when they are among a comparison's strategies:
# uniform random, and foreground-aware random (nnActive, 2025: no method there reliably beat it).
BASELINES = ("random", "fg-random")
# --- the driver ---------------------------------------------------------------------------------------

def _finished_full(run_dir: Path) -> dict | None:
    """A finished full-supervision reference, from one reading of its store: ``"test_dice"`` (its
    headline), ``"metric"`` (which Dice that is), and ``"best_epoch"`` and ``"epochs"`` (its kept and
    last epoch: :func:`convergence`); None when it has no test evaluation yet."""
    if not (run_dir / "run.db").is_file():
        return None
    with RunStore.open_readonly(run_dir) as store:
        ev = [e for e in store.evaluations() if e["split"] == "test"]
        if not ev:
            return None
        metric = run_headline(store)
        found = convergence(store.epochs("initial"))
    return {"test_dice": ev[0][metric], "metric": metric, "best_epoch": found["best_epoch"],
            "epochs": found["epochs"]}


def _recorded_run(run_dir: Path, rounds: Sequence[dict]) -> tuple[str, dict]:
    """An active run's headline metric and what :func:`summarise` takes of it, from one reading of
    its store: ``"rounds"``, per finished round of ``rounds`` (status rows), the expert labels, the
    headline test Dice from the run's recorded evaluations (so a run whose rounds recorded another
    figure as their test Dice, before headlines, is still read alike) and the round's ``effort``
    fact (None where not recorded); ``"train_size"`` and ``"val_size"`` (its split's training and
    validation images; the validation masks are expert labels too)."""
    with RunStore.open_readonly(run_dir) as store:
        metric = run_headline(store)
        tests = {e["round"]: e for e in store.evaluations() if e["split"] == "test"}
        facts = store.round_facts()
        split = store.split()
    curve = []
    for r in rounds:
        ev = tests.get(r["round"])
        value = ev[metric] if ev is not None and ev[metric] is not None else r["test_dice"]
        curve.append({**r, "test_dice": value, "effort": facts.get(r["round"], {}).get("effort")})
    return metric, {"rounds": curve, "train_size": len(split["train"]), "val_size": len(split.get("val") or ())}


def _one_metric(metrics: dict[str, str], where: Path) -> str:
    """The headline every run of a study shares; runs measuring different ones are refused."""
    found = sorted(set(metrics.values()))
    if len(found) > 1:
        first = {m: next(name for name, v in metrics.items() if v == m) for m in found}
        raise AlsegError("runs measure different test Dice and cannot be compared: "
                         + ", ".join(f"{first[m]} {headline_label(m)} ({m})" for m in found), where)
    return found[0] if found else "mean_dice"


def _seed_text(seed_list: list[int]) -> str:
    if seed_list == list(range(len(seed_list))):
        return f"0..{len(seed_list) - 1}"
    return ", ".join(map(str, seed_list))


def _finished_round0(runs: Path, seed: int, reuse: Path | None = None) -> Path | None:
    """An active run of ``seed`` (made by an earlier call, perhaps with other strategies) with round 0 done,
    preferably the one that trained it rather than one that adopted it; else one in ``reuse``
    (another study's runs), whose round 0 a run adopts only where it cannot differ
    (:func:`~alseg.active.loop.adopt_initial_round` checks)."""
    here = _round0_in(runs, seed)
    return here if here is not None or reuse is None else _round0_in(reuse, seed)


def _round0_in(runs: Path, seed: int) -> Path | None:
    found = []
    for run_dir in sorted(runs.glob(f"*-s{seed}")) if runs.is_dir() else ():
        if run_dir.name.startswith("full-") or not (run_dir / "run.db").is_file():
            continue
        try:
            with RunStore.open_readonly(run_dir) as store:
                if store.kind() == "active" and store.round_status(0) == "done":
                    found.append((store.adopted_from(0) is not None, run_dir))
        except AlsegError:  # damaged or being created: not a donor
            continue
    return min(found)[1] if found else None


def _remove_unfinished(run_dir: RunDir) -> None:
    """Remove an interrupted supervised run, unless another process is still training it."""
    run_dir.empty("compare")
    (run_dir.root / LOCK_NAME).unlink()
    run_dir.root.rmdir()


# Settings that may differ between a study's runs: what each run is (its seed and strategy), where
# the data and cache are and the device (another machine may resume), and what the data decides.
_PER_RUN = {"seed", "active.strategy", "data.path", "data.cache_dir", "train.device", "model.in_channels"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


_FULL_EPOCHS = "train.full_epochs"


def _study_settings(config: dict, full: bool) -> dict:
    """What every run of one study shares: its config, flattened, without the per-run keys. The
    full-supervision reference's epoch count is a setting of the reference runs alone (active runs
    made before it existed lack it), compared as the count they train (None means ``train.epochs``)."""
    flat = {k: v for k, v in _flat(config).items() if k not in _PER_RUN}
    flat.pop(_FULL_EPOCHS, None)
    return {**flat, _FULL_EPOCHS: config_from_dict(config).train.reference_epochs} if full else flat


def _run_settings(config: dict, full: bool) -> dict:
    """What one run's result depends on, to check that it belongs to this study: an active run,
    every study setting; a full-supervision reference, all but the active-learning ones and the
    initial epoch count, which it does not use (it trains its own count, ``train.full_epochs``).
    So a study at another schedule (initial or per-round epochs, rounds, strategy settings) can
    take over the references of an earlier one, the most expensive runs of a study."""
    settings = _study_settings(config, full)
    if not full:
        return settings
    return {k: v for k, v in settings.items() if not k.startswith("active.") and k != "train.epochs"}


def _differing_setting(want: dict, have: dict) -> str | None:
    return next((k for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)), None)


def _check_same_settings(runs: Path, config: ExperimentConfig, with_full: bool) -> None:
    """Refuse to add runs to a study whose runs were made with other settings (another --config or
    option, or a preset changed since): their curves would not be comparable, and round 0 would
    not be shared. The full-supervision references count only when the call uses them."""
    want = {kind: _run_settings(config.to_dict(), kind) for kind in (False, True)}  # active runs, references
    for run_dir in sorted(runs.glob("*-s*")) if runs.is_dir() else ():
        full = run_dir.name.startswith("full-")
        if not (run_dir / "run.db").is_file() or (full and not with_full):
            continue
        try:
            with RunStore.open_readonly(run_dir) as store:
                have = _run_settings(store.config(), full)
        except AlsegError:  # being created, or not a run: compare's own checks meet it later
            continue
        key = _differing_setting(want[full], have)
        if key is not None:
            raise AlsegError(f"this study's runs were made with {key} = {have.get(key)!r}, not "
                             f"{want[full].get(key)!r}; give the settings they were made with (--config, options) "
                             "or another --out", run_dir)


def _take_reference(source: Path, run_dir: Path, config: ExperimentConfig, reporter: Reporter) -> bool:
    """Copy another study's finished full-supervision reference ``source`` to ``run_dir`` when this
    study has none there and the reference's settings are this study's (:func:`_run_settings`: it
    depends on no ``active`` setting). Copied to a staging name and renamed, so a kill leaves no
    half reference; the source's writer lock and SQLite's shared-memory file are not copied."""
    if run_dir.exists() or _finished_full(source) is None:
        return False
    with RunStore.open_readonly(source) as store:
        if _differing_setting(_run_settings(config.to_dict(), True), _run_settings(store.config(), True)):
            return False
    staging = run_dir.parent.parent / f".copying-{run_dir.name}"  # beside runs/: no study reads it there
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns(LOCK_NAME, "*-shm"))
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(run_dir)
    reporter.note(f"{run_dir.name}: the reference of {source.parent.parent} (same settings), copied")
    return True


def _make_full(cfg: ExperimentConfig, run_dir: Path, reporter: Reporter) -> dict:
    """The full-supervision reference of ``cfg.seed`` (reused when finished), as :func:`_finished_full`
    reads it."""
    found = _finished_full(run_dir)
    if found is None:
        if run_dir.exists():  # an interrupted supervised run: start it again
            _remove_unfinished(RunDir(run_dir))
        reporter.note(f"full supervision, seed {cfg.seed}")
        train_supervised(cfg, run_dir, full=True, reporter=reporter)
        found = _finished_full(run_dir)
    return found


def _make_active(cfg: ExperimentConfig, strategy: str, run_dir: Path, donor: Path | None,
                 reporter: Reporter) -> dict:
    """Start, resume or reuse ``strategy``'s run of ``cfg.seed``, adopting round 0 from ``donor``.

    One hold of the run's writer lock covers all three steps, so no other writer can come between."""
    reporter.note(f"{strategy}, seed {cfg.seed}")
    s_cfg = dataclasses.replace(cfg, active=dataclasses.replace(cfg.active, strategy=strategy))
    run_dir.mkdir(parents=True, exist_ok=True)  # for the lock file; a folder with only that is unstarted
    folder = RunDir(run_dir)
    with folder.lock("compare", shared_with_callees=True):
        if not folder.db.is_file() or RunStore.never_started(folder):
            start_run(s_cfg, run_dir, reporter)
        if donor is not None and adopt_initial_round(run_dir, donor):
            reporter.note(f"round 0 adopted from {donor.name} (same data, split, model, training and seed)")
        return run_active(resume=run_dir, reporter=reporter)


def _worker(config: ExperimentConfig, runs: Path, reuse: Path | None, seed: int, strategy: str | None, threads: int,
            conn, parent: int) -> None:
    """One run, in a worker process: ``strategy`` None is the full-supervision reference."""
    import threading

    import torch

    def orphaned() -> None:  # the parent killed outright (no Ctrl-C, no finally): stop too
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)  # the run is crash-safe; the same command resumes it

    threading.Thread(target=orphaned, daemon=True).start()
    torch.set_num_threads(threads)
    cfg = dataclasses.replace(config, seed=seed)
    try:
        if strategy is None:
            _make_full(cfg, runs / f"full-s{seed}", SILENT)
        else:
            _make_active(cfg, strategy, runs / f"{strategy}-s{seed}", _finished_round0(runs, seed, reuse), SILENT)
    except AlsegError as exc:
        conn.send(str(exc))
    except KeyboardInterrupt:  # Ctrl-C reaches the workers too; the parent says how to resume
        conn.send("interrupted")
    conn.close()


def _make_runs_in_parallel(config: ExperimentConfig, runs: Path, reuse: Path | None, seeds: Sequence[int],
                           strategies: Sequence[str], full: bool, jobs: int, reporter: Reporter) -> None:
    """Make the runs of ``seeds`` with ``jobs`` worker processes, each with cores / jobs threads.

    One process per core trains faster than one process using every core on small CPUs (1.36x on
    2 cores at quick-isic: ``benchmarks/process_split.py``) and different seeds are independent.
    A seed's round 0 is still trained once: its first strategy's run goes first (adopting round 0
    from ``reuse`` where it can, else training it), and the seed's other runs wait until round 0
    is done there, then adopt it (not at once on the strength of a round 0 in ``reuse`` alone:
    one of other settings would leave each of them training its own). Every run keeps its own writer
    lock and is resumable, so a killed study resumes with the same command. The first error stops
    the workers (what they finished is kept) and is raised here."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no forked copies of torch's thread pools
    threads = max(1, len(os.sched_getaffinity(0)) // jobs)
    # (name, seed, strategy or None for full, needs round 0 done first); trainers of round 0 first
    waiting: list[tuple[str, int, str | None, bool]] = []
    for seed in seeds:
        has_round0 = _round0_in(runs, seed) is not None
        waiting.append((f"{strategies[0]}-s{seed}", seed, strategies[0], False))
        waiting += [(f"{s}-s{seed}", seed, s, not has_round0) for s in strategies[1:]]
        if full and _finished_full(runs / f"full-s{seed}") is None:
            waiting.append((f"full-s{seed}", seed, None, False))
    waiting.sort(key=lambda unit: (unit[3], unit[2] is None))
    total, done = len(waiting), 0
    advance = reporter.stage(f"runs ({jobs} processes x {threads} threads)", total)
    running: dict[str, tuple] = {}
    runs.mkdir(parents=True, exist_ok=True)
    try:
        while waiting or running:
            # each seed's stores read once a poll, and only while a unit still waits on its round 0
            ready = {seed for seed in {seed for _, seed, _, after in waiting if after}
                     if _round0_in(runs, seed) is not None}
            for unit in list(waiting):
                if len(running) >= jobs:
                    break
                name, seed, strategy, after = unit
                if after and seed not in ready and running:  # nothing running: no round 0 to wait for
                    continue
                waiting.remove(unit)
                receive, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_worker, args=(config, runs, reuse, seed, strategy, threads, send, os.getpid()),
                                   name=name)
                proc.start()
                send.close()
                running[name] = (proc, receive)
            time.sleep(0.5)
            for name, (proc, receive) in list(running.items()):
                if proc.exitcode is None:
                    continue
                try:
                    message = receive.recv()  # the worker's error, if it sent one
                except EOFError:
                    message = None
                del running[name]
                if message is not None or proc.exitcode:
                    raise AlsegError(f"{name}: {message or f'worker exited with code {proc.exitcode}'}")
                done += 1
                advance(done)
                reporter.note(f"{name} finished ({done} of {total})")
    finally:
        for proc, _ in running.values():
            proc.terminate()  # every run is crash-safe: the same command resumes them
        for proc, _ in running.values():
            proc.join()
        reporter.end_stage()


class _ExternalScores:
    """Final-model Dice on the external dataset, remembered in ``OUT/external.json``."""

    def __init__(self, out: Path, data: Path, device: str, reporter: Reporter):
        self.file, self.data, self.device, self.reporter = out / "external.json", data, device, reporter
        self.key = str(data.resolve())
        try:
            saved = json.loads(self.file.read_text())
        except (OSError, ValueError):
            saved = {}
        self.runs = saved.get("runs", {}) if isinstance(saved, dict) and saved.get("data") == self.key else {}
        self.metric: str | None = None  # the external data's headline, once a run is scored

    def dice(self, name: str, run_dir: Path) -> float:
        from alseg.evaluate import evaluate, resolve_checkpoint

        ckpt, _ = resolve_checkpoint(run_dir)
        st = ckpt.stat()
        stamp = [ckpt.relative_to(run_dir).as_posix(), st.st_size, st.st_mtime_ns]
        hit = self.runs.get(name)
        if hit and hit.get("checkpoint") == stamp and "headline" in hit["summary"]:  # scored before headlines: again
            summary = hit["summary"]
        else:
            self.reporter.note(f"{name}: scoring the final model on {self.data}")
            summary = evaluate(run_dir, self.data, device=self.device, reporter=self.reporter).summary
            self.runs[name] = {"checkpoint": stamp, "summary": summary}
            atomic_write_text(self.file, json.dumps({"data": self.key, "runs": self.runs}, indent=2))
        self.metric = summary["headline"]
        return summary["headline_dice"]


def compare(config: ExperimentConfig, out: str | Path, *, strategies: Sequence[str], seeds: int | Sequence[int] = 3,
            full: bool = False, external: str | Path | None = None, only_seeds: Sequence[int] | None = None,
            jobs: int = 1, fixed_counts: Sequence[float] | None = None, reuse_from: str | Path | None = None,
            reporter: Reporter = SILENT) -> dict:
    """Run every strategy for seeds 0..seeds-1 (resuming or reusing runs in ``out``) and summarise.

    ``seeds`` may also list the seeds (for example those of a split study that have finished).

    With ``external`` (a labelled dataset in any layout alseg reads), the final model of every run
    and full-supervision reference is also scored on it (:func:`alseg.evaluate.evaluate`).

    With ``only_seeds``, only those seeds' runs are made and nothing is summarised: several
    processes or machines sharing ``out`` can each take some seeds at once (every run has its own
    writer lock, so two never work on one run), and a last call without it summarises them all.
    Returns ``{"seeds": [...], "runs": [...]}`` then.

    With ``jobs`` > 1, the runs are made by that many worker processes at once, each with its
    share of the CPU threads (:func:`_make_runs_in_parallel`); the results are the same runs.

    ``fixed_counts``: the expert-label counts the summary reads each curve's Dice at (:func:`summarise`).

    ``reuse_from``: another study's folder (of other ``active`` settings: ``--round-steps``, rounds,
    per-round epochs) whose finished work this one takes where it cannot differ: each seed's round 0
    is adopted from its runs (:func:`~alseg.active.loop.adopt_initial_round` checks that nothing it
    depends on differs), and its full-supervision references are copied in when their settings are
    this study's (:func:`_take_reference`). A study at equal steps so trains neither again.
    """
    known = strategy_names()
    bad = [s for s in strategies if s not in known]
    if bad:
        raise AlsegError(f"unknown strategy {bad[0]!r}; choose from {', '.join(known)}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else sorted({int(k) for k in seeds})
    if not seed_list or seed_list[0] < 0:
        raise AlsegError("--seeds must be at least 1" if isinstance(seeds, int) else "--seeds must list seeds >= 0")
    if only_seeds is not None and (not only_seeds or any(k not in seed_list for k in only_seeds)):
        raise AlsegError(f"--only-seeds must name seeds among {_seed_text(seed_list)}")
    if jobs < 1:
        raise AlsegError(f"--jobs must be at least 1, got {jobs}")
    if external is not None and not Path(external).exists():
        raise AlsegError("no such external dataset", external)
    out = Path(out)
    runs = out / "runs"
    scorer = _ExternalScores(out, Path(external), config.train.device, reporter) if external is not None else None
    results: dict[str, list[dict]] = {s: [] for s in strategies}
    full_runs: dict[int, dict] = {}
    train_sizes: dict[int, int] = {}  # per seed: a split by patient gives each seed its own
    metrics: dict[str, str] = {}  # run name -> its headline test Dice
    made = seed_list if only_seeds is None else sorted(set(only_seeds))
    reuse = None if reuse_from is None else Path(reuse_from) / "runs"
    if reuse is not None and not reuse.is_dir():
        raise AlsegError("no study's runs here (give the --out of an earlier alseg compare)", reuse_from)
    if full and reuse is not None:
        for seed in made:
            _take_reference(reuse / f"full-s{seed}", runs / f"full-s{seed}", config, reporter)
    _check_same_settings(runs, config, full)
    if jobs > 1:  # make every run in worker processes; the pass below then only collects them
        _make_runs_in_parallel(config, runs, reuse, made, strategies, full, jobs, reporter)
    for seed in made:
        cfg = dataclasses.replace(config, seed=seed)
        if full:
            run_dir = runs / f"full-s{seed}"
            found = _make_full(cfg, run_dir, reporter)
            metrics[run_dir.name] = found.pop("metric")
            full_runs[seed] = found
            if scorer:
                full_runs[seed]["external_dice"] = scorer.dice(run_dir.name, run_dir)
        donor = _finished_round0(runs, seed, reuse)  # else the seed's first run here trains it, the others adopt it
        for strategy in strategies:
            run_dir = runs / f"{strategy}-s{seed}"
            result = _make_active(cfg, strategy, run_dir, donor, reporter)
            donor = _round0_in(runs, seed) or donor  # round 0 done here, once a run here has it
            metrics[run_dir.name], recorded = _recorded_run(run_dir, result["rounds"])
            train_sizes[seed] = recorded["train_size"]
            record = {"seed": seed, **recorded}
            if scorer:
                record["external_dice"] = scorer.dice(run_dir.name, run_dir)
            results[strategy].append(record)
    metric = _one_metric(metrics, runs)
    if only_seeds is not None:
        return {"seeds": sorted(set(only_seeds)),
                "runs": [f"full-s{r}" for r in sorted(full_runs)]
                + [f"{name}-s{r['seed']}" for name, per_seed in results.items() for r in per_seed]}
    return _write_summary(out, summarise(results, full_runs, _mean_size(train_sizes), fixed_counts=fixed_counts),
                          preset=config.preset,
                          split_preset=config.data.split_preset, seed_list=seed_list, external=external,
                          settings=_study_settings(config.to_dict(), full), metric=metric,
                          external_metric=scorer.metric if scorer else None)


def _mean_size(train_sizes: dict[int, int]) -> int | None:
    """The train split's size over seeds (the label axis's 100 %), a whole number of images."""
    return round(float(np.mean(list(train_sizes.values())))) if train_sizes else None


def _write_summary(out: Path, summary: dict, *, preset: str, split_preset: str, seed_list: list[int],
                   external: str | Path | None, settings: dict, metric: str = "mean_dice",
                   external_metric: str | None = None) -> dict:
    """Complete ``summary`` with what the study was (which test Dice it compares: ``metric``, and
    ``external_metric`` on the external dataset) and write compare.json, .csv and .png in ``out``."""
    from alseg.report import figures  # matplotlib only when a figure is drawn

    paper = PAPER_DICE.get(split_preset)
    summary.update({"preset": preset, "split_preset": split_preset, "seeds": len(seed_list), "seed_list": seed_list,
                    "metric": metric, "metric_label": headline_label(metric),
                    "paper_dice": paper, "figure": str(out / "compare.png"),
                    "external": {"data": str(external)} if external is not None else None,
                    "external_metric": external_metric, "settings": settings})
    out.mkdir(parents=True, exist_ok=True)
    _figure(figures, out / "compare.png", preset, len(seed_list), summary, paper)
    atomic_write_text(out / "compare.json", json.dumps(summary, indent=2))
    atomic_write_bytes(out / "compare.csv", _csv(summary, external is not None).encode())
    return summary


def merge(studies: Sequence[str | Path], out: str | Path, *, fixed_counts: Sequence[float] | None = None) -> dict:
    """One summary from studies of the same settings made apart (other machines or sessions that
    could not share a folder): their ``compare.json`` files (or folders holding one), each with
    some of the seeds. The runs' curves are read from the files, so nothing is trained or read
    from run folders; the result is what one ``compare`` over all their runs would summarise, and
    is written to ``out`` as compare.json, .csv and .png.

    ``fixed_counts``: the expert-label counts Dice is read at (:func:`summarise`; default: its rule).
    A study summarised before validation sizes, effort or the references' epochs were recorded
    merges with those missing (None), not refused.

    Refused, naming the file: a file that is not a comparison summary or predates per-run curves,
    settings that differ from the first file's, and a run present in two files with other values
    (one summarised while still running and later is the same run: its longer curve is kept).
    """
    out = Path(out)
    runs: dict[str, dict] = {}
    first: dict | None = None
    for study in studies:
        path, summary = _read_summary(study)
        first = first or summary
        # the split preset and every other setting are in "settings" (data.split_preset, ...)
        key = _differing_setting(first["settings"], summary["settings"])
        if key is not None:
            raise AlsegError(f"made with {key} = {summary['settings'].get(key)!r}, not "
                             f"{first['settings'].get(key)!r} as the first study: its curves are not comparable",
                             path)
        metric = summary.get("metric", "mean_dice")  # studies summarised before headlines compared per image
        if metric != first.get("metric", "mean_dice"):
            raise AlsegError(f"compares {headline_label(metric)} ({metric}), not "
                             f"{headline_label(first.get('metric', 'mean_dice'))} as the first study", path)
        if bool(summary.get("external")) != bool(first.get("external")):
            raise AlsegError("scored on an external dataset where the first study was not, or the other way "
                             "round: give studies made alike", path)
        for name, run in summary["runs"].items():
            # what was measured, not what a study derived from it with its other runs (AULC over the
            # rounds every seed finished, labels to 95 % of full)
            # (keys a study made before they were recorded lacks are None: no validation size, no epochs)
            measured = {k: run.get(k) for k in ("strategy", "seed", "curve", "train_size", "val_size", "test_dice",
                                                "best_epoch", "epochs", "external_dice")}
            if name in runs and runs[name] != measured:
                shorter, longer = sorted((runs[name], measured), key=lambda r: len((r["curve"] or {}).get("test_dice", [])))
                if not _earlier_state(shorter, longer):
                    raise AlsegError(f"run {name} is also in an earlier study, with other results", path)
                measured = longer  # summarised before and after more rounds: the later state
            runs[name] = measured
    if first is None:
        raise AlsegError("name at least one comparison summary to merge")
    strategies = list(dict.fromkeys(r["strategy"] for r in runs.values() if r["strategy"] != "full"))
    results: dict[str, list[dict]] = {s: [] for s in strategies}
    full_runs: dict[int, dict] = {}
    train_sizes: dict[int, int] = {}
    for run in sorted(runs.values(), key=lambda r: r["seed"]):
        extra = {"external_dice": run["external_dice"]} if run["external_dice"] is not None else {}
        if run["strategy"] == "full":
            full_runs[run["seed"]] = {"test_dice": run["test_dice"], "best_epoch": run["best_epoch"],
                                      "epochs": run["epochs"], **extra}
        else:
            c = run["curve"]
            changed = c.get("pixels_changed") or [None] * len(c["test_dice"])
            pseudo = c.get("pseudo_labelled") or [None] * len(c["test_dice"])
            rounds = [{"expert_labelled": x, "test_dice": y, "effort": None if p is None else {"pixels_changed": p},
                       "pseudo_labelled": q}
                      for x, y, p, q in zip(c["expert_labelled"], c["test_dice"], changed, pseudo)]
            results[run["strategy"]].append({"seed": run["seed"], "train_size": run["train_size"],
                                             "val_size": run["val_size"], "rounds": rounds, **extra})
            train_sizes[run["seed"]] = run["train_size"]
    seed_list = sorted({r["seed"] for r in runs.values()})
    return _write_summary(out, summarise(results, full_runs, _mean_size(train_sizes), fixed_counts=fixed_counts),
                          preset=first["preset"],
                          split_preset=first["split_preset"], seed_list=seed_list,
                          external=(first["external"] or {}).get("data"), settings=first["settings"],
                          metric=first.get("metric", "mean_dice"),
                          external_metric=first.get("external_metric"))


def _read_summary(study: str | Path) -> tuple[Path, dict]:
    """A study's compare.json (the file, or a folder holding it), checked to be one merge can use."""
    path = Path(study) / "compare.json" if Path(study).is_dir() else Path(study)
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise AlsegError("no such comparison summary (compare.json)", path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AlsegError(f"not a comparison summary: {exc}", path) from None
    if not isinstance(summary, dict) or not isinstance(summary.get("runs"), dict):
        raise AlsegError("not a comparison summary (no runs)", path)
    active = [r for r in summary["runs"].values() if r.get("strategy") != "full"]
    if "settings" not in summary or any("curve" not in r or "train_size" not in r for r in active):
        raise AlsegError("made by an earlier alseg that did not record each run's curve and settings; "
                         "summarise its folder again with the same alseg compare command", path)
    return path, summary


def _earlier_state(shorter: dict, longer: dict) -> bool:
    """Whether ``shorter`` is the same active run as ``longer`` summarised before its last rounds."""
    if shorter["curve"] is None or longer["curve"] is None:
        return False
    n = len(shorter["curve"]["test_dice"])
    same = {k: v for k, v in shorter.items() if k not in ("curve", "external_dice")}
    def column(curve: dict, key: str) -> list:  # pixels_changed, pseudo_labelled: absent from older studies
        return curve.get(key) or [None] * len(curve["test_dice"])

    return same == {k: v for k, v in longer.items() if k not in ("curve", "external_dice")} and all(
        column(shorter["curve"], k) == column(longer["curve"], k)[:n]
        for k in ("expert_labelled", "test_dice", "pixels_changed", "pseudo_labelled"))


def _flat_summary(name: str, values: Sequence[float | None]) -> dict:
    """``{name: mean, name_interval: [lo, hi], name_per_seed: [...]}`` (:func:`seed_summary`), the summary's
    layout for one value per seed."""
    s = seed_summary(values)
    return {name: s["mean"], f"{name}_interval": [s["lo"], s["hi"]], f"{name}_per_seed": s["per_seed"]}


def _curve_band(ys: np.ndarray) -> dict:
    """Mean, standard deviation and per-round interval (:func:`bootstrap_interval`) of ``ys`` (seeds x rounds)."""
    band = [bootstrap_interval(ys[:, k]) for k in range(ys.shape[1])]
    return {"mean": ys.mean(0).tolist(), "std": ys.std(0).tolist(), "lo": [b[0] for b in band],
            "hi": [b[1] for b in band], "n": len(ys), "band": interval_name(len(ys))}


def summarise(results: dict[str, list[dict]], full_runs: dict[int, dict], train_size: int | None, *,
              fixed_counts: Sequence[float] | None = None) -> dict:
    """The comparison summary from the runs' rounds (pure: no files).

    ``results[strategy]`` lists per seed ``{"seed", "rounds": [{"expert_labelled", "test_dice", "effort"?}, ...],
    "train_size"?, "val_size"?, "external_dice"?}``, where a round's ``effort`` is its recorded fact
    (``{"pixels_changed", ...}``, rounds >= 1) and ``val_size`` the run's validation images;
    ``full_runs[seed] = {"test_dice", "best_epoch"?, "epochs"?, "external_dice"?}``. A strategy's curve
    keeps the rounds every seed finished; paired differences use the rounds both strategies finished.

    ``fixed_counts``: the expert-label counts ``dice_at_labels`` reads each curve at (default:
    :func:`default_fixed_counts` of the mean label counts of the rounds every run finished).
    """
    full_dice = {seed: f["test_dice"] for seed, f in full_runs.items()}
    with_external = any("external_dice" in r for per_seed in results.values() for r in per_seed)
    rounds_done = {s: min(len(r["rounds"]) for r in per_seed) for s, per_seed in results.items()}
    for strategy, done in rounds_done.items():
        if done == 0:
            raise AlsegError(f"{strategy}: a run has no finished round to compare")
    common = min(rounds_done.values(), default=0)
    mean_x = [float(np.mean([r["rounds"][k]["expert_labelled"] for per_seed in results.values() for r in per_seed]))
              for k in range(common)]
    if fixed_counts is not None and (not len(fixed_counts) or not all(np.isfinite(c) and c >= 0 for c in fixed_counts)):
        raise AlsegError(f"fixed label counts must be one or more numbers >= 0, not {list(fixed_counts)}")
    counts = [float(c) for c in fixed_counts] if fixed_counts is not None else default_fixed_counts(mean_x)
    out: dict = {"train_size": train_size, "strategies": {}, "runs": {},
                 "intervals": {"method": "percentile bootstrap of the mean over seeds (seeds resampled with "
                                         "replacement)", "level": LEVEL, "resamples": RESAMPLES,
                               "rng_seed": BOOTSTRAP_SEED,
                               "note": "one seed: the interval is the value itself (no spread to estimate); "
                                       f"2 to {RANGE_UP_TO} seeds: the interval is the range of the per-seed "
                                       "values, so with few seeds a paired interval that excludes 0 (all seeds "
                                       "agree in sign) is weaker evidence than its p-value says: read p_value"},
                 "paired_tests": {"method": "two-sided sign-flip permutation test of the mean per-seed difference "
                                            "(statistic |mean|; p counts the sign assignments at least as extreme, "
                                            "the observed one included)",
                                  "exact_up_to_seeds": EXACT_FLIPS_UP_TO, "monte_carlo_flips": MONTE_CARLO_FLIPS,
                                  "rng_seed": BOOTSTRAP_SEED,
                                  "smallest_p": "2 / 2^n for n seeds: 0.5 (2), 0.25 (3), 0.0625 (5), 0.002 (10)"},
                 "labels_to_95pct_full_rule": "per seed, expert labels where test Dice first reaches 0.95 x that "
                                              "seed's full-supervision Dice, interpolated linearly between rounds; "
                                              "mean and interval null when any seed never reaches it",
                 "labels_to_98pct_full_rule": "the same at 0.98 x the seed's full-supervision Dice",
                 "dice_at_labels_counts": counts,
                 "dice_at_labels_rule": "per seed, test Dice interpolated linearly at each of dice_at_labels_counts "
                                        "expert labels (null outside the seed's curve); "
                                        + ("the counts were given" if fixed_counts is not None else
                                           "the counts are the mean label counts of round 1 and of the "
                                           "last-but-one round (the last may take every image left in the pool)"),
                 "labels_with_validation_rule": "expert labels plus the run's validation images (masks an expert "
                                                "drew too); fractions are of the train + validation images",
                 "pseudo_labels_trained_rule": "per seed, the pseudo-labels every round's model trained on, summed "
                                               "over rounds (the gate may take none: then ceal trains as "
                                               "ceal-no-pseudo and random-pseudo as random)",
                 "effort_rule": "megapixels (at working size) the expert changed from the model's predicted masks, "
                                "summed over rounds 1.. (round 0: 0), from each round's recorded effort; "
                                "null for runs that did not record it",
                 "baselines": [b for b in BASELINES if b in results],
                 "baseline": next((b for b in BASELINES if b in results), None)}
    if full_runs:
        seeds = sorted(full_dice)
        fs = seed_summary([full_dice[s] for s in seeds])
        best = [full_runs[s].get("best_epoch") for s in seeds]
        epochs = [full_runs[s].get("epochs") for s in seeds]
        still = [None if b is None or e is None else b == e for b, e in zip(best, epochs)]
        out["full_dice"] = fs["mean"]
        out["full"] = {"test_dice": fs, "best_epoch_per_seed": best, "epochs_per_seed": epochs,
                       "epochs": epochs[0] if len(set(epochs)) == 1 else None,
                       "still_improving_per_seed": still,
                       "still_improving_seeds": [s for s, flag in zip(seeds, still) if flag]}
        if with_external:
            out["full"]["external_dice"] = seed_summary([full_runs[s].get("external_dice") for s in seeds])
        for seed, flag in zip(seeds, still):
            out["runs"][f"full-s{seed}"] = {"strategy": "full", "seed": seed, "best_epoch": None, "epochs": None,
                                            **full_runs[seed], "still_improving": flag}
    else:
        out["full_dice"], out["full"] = None, None

    def per_seed_metrics(per_seed: list[dict], n_rounds: int) -> dict:
        xs = [[float(r["rounds"][k]["expert_labelled"]) for k in range(n_rounds)] for r in per_seed]
        ys = [[float(r["rounds"][k]["test_dice"]) for k in range(n_rounds)] for r in per_seed]

        def need(share: float) -> list[float | None]:
            return [labels_to_reach(x, y, share * full_dice[r["seed"]], interpolate=True) if r["seed"] in full_dice
                    else None for x, y, r in zip(xs, ys, per_seed)]

        changed = [cumulative_pixels_changed(r["rounds"][:n_rounds]) for r in per_seed]
        # pseudo-labels each round's model trained on, summed (None for runs summarised before they were read)
        pseudo = [None if any(r["rounds"][k].get("pseudo_labelled") is None for k in range(n_rounds))
                  else int(sum(r["rounds"][k]["pseudo_labelled"] for k in range(n_rounds))) for r in per_seed]
        with_val = [None if r.get("val_size") is None else x[-1] + r["val_size"] for x, r in zip(xs, per_seed)]
        return {"x": xs, "y": ys, "final_dice": [y[-1] for y in ys], "aulc": [aulc(x, y) for x, y in zip(xs, ys)],
                "labels_to_95pct_full": need(0.95), "labels_to_98pct_full": need(0.98),
                "dice_at_labels": [[dice_at(x, y, c) for x, y in zip(xs, ys)] for c in counts],
                "pixels_changed": changed, "final_pixels_changed": [None if c is None else c[-1] for c in changed],
                "final_labels_with_validation": with_val, "pseudo_labels_trained": pseudo,
                "final_fraction_labelled": [x[-1] / r["train_size"] if r.get("train_size") else None
                                            for x, r in zip(xs, per_seed)],
                "final_fraction_labelled_with_validation": [
                    None if v is None or not r.get("train_size") else v / (r["train_size"] + r["val_size"])
                    for v, r in zip(with_val, per_seed)]}

    for strategy, per_seed in results.items():
        m = per_seed_metrics(per_seed, rounds_done[strategy])
        xs, ys = np.array(m["x"]), np.array(m["y"])
        x = xs.mean(0)
        val_sizes = [r.get("val_size") for r in per_seed]
        curve = {"x": x.tolist(), **_curve_band(ys),
                 "labels_with_validation": None if None in val_sizes else (x + np.mean(val_sizes)).tolist()}
        effort_curve = None
        if all(c is not None for c in m["pixels_changed"]):
            effort_x = np.array(m["pixels_changed"], float) / MEGAPIXEL
            effort_curve = {"x": effort_x.mean(0).tolist(), "x_per_seed": effort_x.tolist(), **_curve_band(ys),
                            "unit": "megapixels changed (working size)"}
        need = {share: seed_summary(m[f"labels_to_{share}pct_full"]) if full_dice else None for share in (95, 98)}
        t = {"curve": curve, "seeds": [r["seed"] for r in per_seed],
             **_flat_summary("final_dice", m["final_dice"]), "final_expert_labels": float(x[-1]),
             **_flat_summary("aulc", m["aulc"])}
        for share in (95, 98):
            key, s = f"labels_to_{share}pct_full", need[share]
            t.update({f"{key}_per_seed": m[key], key: s["mean"] if s else None,
                      f"{key}_interval": [s["lo"], s["hi"]] if s and s["mean"] is not None else None,
                      f"{key}_not_reached": ([r["seed"] for r, v in zip(per_seed, m[key]) if v is None]
                                             if full_dice else None)})
        t["dice_at_50pct_labels"] = dice_at(x, curve["mean"], 0.5 * train_size) if train_size else None
        t["dice_at_labels"] = [{"labels": c, **seed_summary(v)} for c, v in zip(counts, m["dice_at_labels"])]
        with_val = seed_summary(m["final_labels_with_validation"])
        t["final_labels_with_validation"] = with_val["mean"]
        t.update(_flat_summary("final_fraction_labelled", m["final_fraction_labelled"]))
        t.update(_flat_summary("final_fraction_labelled_with_validation", m["final_fraction_labelled_with_validation"]))
        t["effort_curve"] = effort_curve
        t.update(_flat_summary("final_pixels_changed", m["final_pixels_changed"]))
        t.update(_flat_summary("pseudo_labels_trained", m["pseudo_labels_trained"]))
        if with_external:
            t.update(_flat_summary("external_dice", [r.get("external_dice") for r in per_seed]))
        out["strategies"][strategy] = t
        for k, r in enumerate(per_seed):
            val_size = r.get("val_size")
            labelled = [float(v["expert_labelled"]) for v in r["rounds"]]
            run_changed = cumulative_pixels_changed(r["rounds"])
            run = {"strategy": strategy, "seed": r["seed"], "rounds": len(r["rounds"]),
                   "final_expert_labels": float(r["rounds"][rounds_done[strategy] - 1]["expert_labelled"]),
                   "final_dice": m["final_dice"][k], "aulc": m["aulc"][k],
                   "labels_to_95pct_full": m["labels_to_95pct_full"][k],
                   "labels_to_98pct_full": m["labels_to_98pct_full"][k],
                   "dice_at_labels": [v[k] for v in m["dice_at_labels"]],
                   "curve": {"expert_labelled": labelled, "test_dice": [float(v["test_dice"]) for v in r["rounds"]],
                             "pixels_changed": [(v.get("effort") or {}).get("pixels_changed") for v in r["rounds"]],
                             "pseudo_labelled": [v.get("pseudo_labelled") for v in r["rounds"]]},
                   "val_size": val_size,
                   "labels_with_validation": None if val_size is None else [v + val_size for v in labelled],
                   "final_fraction_labelled_with_validation": m["final_fraction_labelled_with_validation"][k],
                   "effort_megapixels": None if run_changed is None else [v / MEGAPIXEL for v in run_changed],
                   "final_pixels_changed": m["final_pixels_changed"][k],
                   "pseudo_labels_trained": m["pseudo_labels_trained"][k]}
            for key in ("train_size", "external_dice"):
                if key in r:
                    run[key] = r[key]
            out["runs"][f"{strategy}-s{r['seed']}"] = run
    for baseline in out["baselines"]:
        base_by_seed = {r["seed"]: r for r in results[baseline]}
        for strategy, per_seed in results.items():
            if strategy == baseline:
                continue
            paired = [r for r in per_seed if r["seed"] in base_by_seed]
            n = min(rounds_done[strategy], rounds_done[baseline])
            mine = per_seed_metrics(paired, n)
            base = per_seed_metrics([base_by_seed[r["seed"]] for r in paired], n)
            vs = {"rounds": n, "seeds": [r["seed"] for r in paired],
                  **{k: paired_differences(mine[k], base[k]) for k in _PAIRED}}
            vs["dice_at_labels"] = [{"labels": c, **paired_differences(a, b)}
                                    for c, a, b in zip(counts, mine["dice_at_labels"], base["dice_at_labels"])]
            if not full_dice:
                vs["labels_to_95pct_full"] = vs["labels_to_98pct_full"] = None
            if all(v is None for v in mine["final_pixels_changed"] + base["final_pixels_changed"]):
                vs["final_pixels_changed"] = None  # neither recorded effort: nothing to pair
            out["strategies"][strategy][f"vs_{baseline}"] = vs
    return out


# what each strategy is paired against each baseline on (per seed); Dice at fixed counts besides
_PAIRED = ("aulc", "final_dice", "labels_to_95pct_full", "labels_to_98pct_full", "final_pixels_changed")


def _figure(figures, path: Path, preset: str, seeds: int, summary: dict, paper: float | None) -> None:
    curves = {s: t["curve"] for s, t in summary["strategies"].items()}
    effort = {s: t["effort_curve"] for s, t in summary["strategies"].items() if t.get("effort_curve")}
    full_line, full_band = None, None
    if summary["full"]:
        f = summary["full"]["test_dice"]
        full_line = (f["mean"], f["lo"], f["hi"])
        full_band = interval_name(len(f["per_seed"]))
    if seeds > 1:
        what = f"{seeds} seeds; bands: {interval_name(seeds)}"
    else:
        what = "1 seed: no interval"
    label = HEADLINE_TEST_LABELS[summary["metric"]]
    figures.learning_curves(path, f"{preset}: {label} vs expert labels ({what})", curves,
                            train_size=summary["train_size"], full=full_line, paper=paper,
                            full_epochs=summary["settings"].get("train.full_epochs"),
                            ylabel=f"{label} (mean over seeds)", full_band=full_band, effort=effort or None)


def _csv(summary: dict, with_external: bool) -> str:
    def cell(v):
        if v is None:
            return ""
        if isinstance(v, bool):
            return str(v).lower()
        return v

    def seeds_cell(values):
        return " ".join("None" if v is None else str(v) for v in values)

    def pair(interval):
        return interval or [None, None]

    counts = summary.get("dice_at_labels_counts") or []
    full = summary.get("full") or {}
    buf = io.StringIO()
    writer = csv.writer(buf)
    head = ["strategy", "labels_to_95pct_full_mean", "labels_to_95pct_full_per_seed", "dice_at_50pct_labels",
            "final_dice_mean", "final_expert_labels", "final_dice_lo", "final_dice_hi", "aulc_mean", "aulc_lo",
            "aulc_hi", "labels_to_95pct_full_lo", "labels_to_95pct_full_hi", "labels_to_95pct_full_seeds_not_reached",
            "labels_to_98pct_full_mean", "labels_to_98pct_full_lo", "labels_to_98pct_full_hi",
            "labels_to_98pct_full_seeds_not_reached"]
    for c in counts:
        head += [f"dice_at_{c:g}_labels_{p}" for p in ("mean", "lo", "hi")]
    head += ["final_labels_with_validation", "final_fraction_labelled", "final_fraction_labelled_with_validation",
             "final_pixels_changed_mean", "final_pixels_changed_lo", "final_pixels_changed_hi",
             "pseudo_labels_trained_mean", "pseudo_labels_trained_per_seed"]
    if with_external:
        head += ["external_dice_mean", "external_dice_lo", "external_dice_hi"]
    baselines = summary["baselines"]
    for b in baselines:
        for k in _PAIRED:
            head += [f"diff_vs_{b}_{k}_{p}" for p in ("mean", "lo", "hi", "excludes_zero", "p_value")]
        for c in counts:
            head += [f"diff_vs_{b}_dice_at_{c:g}_labels_{p}" for p in ("mean", "lo", "hi", "p_value")]
        head.append(f"diff_vs_{b}_p_method")
    head += ["full_epochs", "full_best_epoch_per_seed", "full_still_improving_seeds",
             "metric"]  # metric last: which test Dice every Dice column is
    writer.writerow(head)
    for s, t in summary["strategies"].items():
        row = [s, t["labels_to_95pct_full"], seeds_cell(t["labels_to_95pct_full_per_seed"]), t["dice_at_50pct_labels"],
               t["final_dice"], t["final_expert_labels"], *t["final_dice_interval"], t["aulc"], *t["aulc_interval"]]
        for share in (95, 98):
            key = f"labels_to_{share}pct_full"
            not_reached = t[f"{key}_not_reached"]
            if share == 98:
                row.append(t[key])
            row += [*pair(t[f"{key}_interval"]), None if not_reached is None else " ".join(map(str, not_reached))]
        row += [v for d in t["dice_at_labels"] for v in (d["mean"], d["lo"], d["hi"])]
        row += [t["final_labels_with_validation"], t["final_fraction_labelled"],
                t["final_fraction_labelled_with_validation"], t["final_pixels_changed"],
                *t["final_pixels_changed_interval"], t["pseudo_labels_trained"],
                seeds_cell(t["pseudo_labels_trained_per_seed"])]
        if with_external:
            row += [t["external_dice"], *t["external_dice_interval"]]
        for b in baselines:
            vs = t.get(f"vs_{b}") or {}
            for k in _PAIRED:
                d = vs.get(k) or {}
                row += [d.get("mean"), d.get("lo"), d.get("hi"), d.get("excludes_zero"), d.get("p_value")]
            at = vs.get("dice_at_labels") or [{} for _ in counts]
            row += [v for d in at for v in (d.get("mean"), d.get("lo"), d.get("hi"), d.get("p_value"))]
            row.append((vs.get("final_dice") or {}).get("p_method"))
        row += [full.get("epochs"),
                seeds_cell(full["best_epoch_per_seed"]) if full else None,
                " ".join(map(str, full["still_improving_seeds"])) if full else None, summary["metric_label"]]
        writer.writerow([cell(v) for v in row])
    return buf.getvalue()
