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
  settings or initial epochs is reused, as it depends on neither);
* ``OUT/compare.png``: test Dice against expert labels, each strategy's mean over seeds with a
  band of its 95 % bootstrap interval, the full-supervision line and the paper's reported Dice;
* ``OUT/compare.json`` and ``OUT/compare.csv``: per strategy, over seeds (mean, 95 % interval and
  the per-seed values): the curve, the final test Dice, the area under the learning curve
  (:func:`aulc`), the expert labels needed to reach 95 % of the seed's full-supervision Dice
  (:func:`labels_to_reach`, interpolated between rounds), the test Dice at 50 % labels, and the
  paired per-seed differences against ``random`` (:func:`paired_differences`); with
  ``external``, the Dice of every run's final model on a second labelled dataset;
* ``OUT/external.json``: with ``external``, the external scores already computed, keyed by the
  dataset's path and each checkpoint's file, size and time, so a rerun does not score again.

"Test Dice" throughout is each run's headline (:func:`alseg.evaluate.headline_metric`): the mean
per-volume Dice (Buda et al.) when the test split holds whole volumes, else the mean Dice over
images. It is read from each run's recorded evaluations, the same for the active runs and the
full-supervision references; the summary names it (``metric``, ``metric_label``), and runs that
measure different headlines are refused rather than compared.

Studies made apart (machines or sessions that cannot share ``OUT``) with the same settings are
summarised as one by :func:`merge` from their ``compare.json`` files, which hold every run's curve.

The statistics are the pure functions below (:func:`bootstrap_interval`, :func:`aulc`,
:func:`labels_to_reach`, :func:`seed_summary`, :func:`paired_differences`); :func:`compare` only
runs, collects and writes.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
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

BASELINE = "random"
RESAMPLES = 2000
LEVEL = 0.95
BOOTSTRAP_SEED = 0


# --- statistics (pure) ------------------------------------------------------------------------------

def bootstrap_interval(values: Sequence[float], *, seed: int = BOOTSTRAP_SEED, resamples: int = RESAMPLES,
                       level: float = LEVEL) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of ``values`` (one value per seed).

    Draws ``resamples`` samples of ``len(values)`` values with replacement (a generator seeded with
    ``seed``, so the same values always give the same interval), takes each sample's mean, and
    returns the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of those means. One value (or
    all values equal) gives ``(value, value)``: there is no spread to estimate. No values gives
    None.

    With very few seeds the interval is optimistic: for 2 or 3 values it is exactly their range
    (each extreme is drawn alone more often than 2.5 % of the time), so it says how far the seeds
    spread, not how far the mean could be.
    """
    v = np.asarray(values, dtype=float)
    if v.ndim != 1:
        raise ValueError("bootstrap_interval takes a flat list of values")
    if not np.all(np.isfinite(v)):
        raise ValueError("bootstrap_interval needs finite values")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError("level must be in (0, 1) and resamples at least 1")
    if len(v) == 0:
        return None
    if len(v) == 1 or np.all(v == v[0]):
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(resamples, len(v)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def aulc(x: Sequence[float], y: Sequence[float]) -> float:
    """Area under the learning curve ``y`` (test Dice) over ``x`` (expert labels), by the trapezoid
    rule, divided by the label range ``x[-1] - x[0]``: the curve's mean Dice over the labels it
    spans, on the same 0..1 scale as Dice. A single point (or no label range) gives its Dice.
    """
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xa.ndim != 1 or xa.shape != ya.shape or len(xa) == 0:
        raise ValueError("aulc needs two flat sequences of the same, non-zero length")
    if np.any(np.diff(xa) < 0):
        raise ValueError("aulc needs label counts in increasing order")
    width = xa[-1] - xa[0]
    if width == 0:
        return float(ya[0])
    return float(np.sum(np.diff(xa) * (ya[1:] + ya[:-1]) / 2) / width)


def labels_to_reach(x: Sequence[float], y: Sequence[float], target: float, *,
                    interpolate: bool = False) -> float | None:
    """Expert labels at which the curve first reaches ``target`` (``y >= target``); None if never.

    Without ``interpolate``, the label count of the first round at or above the target. With it,
    the label count where the straight line between that round and the round before crosses the
    target (the first round itself when the curve starts at or above it): an estimate between
    rounds, not a count anybody labelled. Only the first crossing counts, even if the curve falls
    back below the target later.
    """
    if len(x) != len(y):
        raise ValueError("labels_to_reach needs as many label counts as Dice values")
    for i, (xi, yi) in enumerate(zip(x, y)):
        if yi >= target:
            if not interpolate or i == 0:
                return float(xi)
            x0, y0 = float(x[i - 1]), float(y[i - 1])  # y0 < target <= yi
            return float(x0 + (target - y0) / (float(yi) - y0) * (float(xi) - x0))
    return None


def dice_at(x: Sequence[float], y: Sequence[float], target: float) -> float | None:
    """The curve's value at ``target`` labels, interpolated linearly; None outside the curve."""
    if not len(x) or target < x[0] or target > x[-1]:
        return None
    return float(np.interp(target, x, y))


def seed_summary(values: Sequence[float | None], *, seed: int = BOOTSTRAP_SEED, resamples: int = RESAMPLES,
                 level: float = LEVEL) -> dict:
    """``{"mean", "lo", "hi", "per_seed", "missing"}`` for one value per seed, None for a seed
    without a value (e.g. it never reached a target). Mean and interval (:func:`bootstrap_interval`)
    are None when any seed is missing: a mean over the seeds that happened to succeed would flatter.
    """
    per_seed = [None if v is None else float(v) for v in values]
    missing = sum(v is None for v in per_seed)
    if missing or not per_seed:
        return {"mean": None, "lo": None, "hi": None, "per_seed": per_seed, "missing": missing}
    lo, hi = bootstrap_interval(per_seed, seed=seed, resamples=resamples, level=level)
    return {"mean": float(np.mean(per_seed)), "lo": lo, "hi": hi, "per_seed": per_seed, "missing": 0}


def paired_differences(values: Sequence[float | None], baseline: Sequence[float | None], *,
                       seed: int = BOOTSTRAP_SEED, resamples: int = RESAMPLES, level: float = LEVEL) -> dict:
    """Per-seed differences ``values[i] - baseline[i]`` (the same seeds in the same order, so each
    pair shares split, initial set and initial model), their mean and bootstrap interval over seeds.

    Returns :func:`seed_summary` of the differences plus ``n`` (seeds) and ``excludes_zero``: True
    when the interval lies wholly above or below 0, False when it contains 0, None when there is
    no interval to judge (fewer than 2 seeds, or a seed without a value on either side). With 2 or
    3 seeds the interval is the range of the differences, so it excludes 0 whenever all seeds
    agree in sign, which happens by chance half (2 seeds) or a quarter (3 seeds) of the time.
    """
    if len(values) != len(baseline):
        raise ValueError("paired_differences needs one baseline value per seed")
    diffs = [None if a is None or b is None else float(a) - float(b) for a, b in zip(values, baseline)]
    out = seed_summary(diffs, seed=seed, resamples=resamples, level=level)
    out["n"] = len(diffs)
    if out["mean"] is None or len(diffs) < 2:
        out["excludes_zero"] = None
    else:
        out["excludes_zero"] = bool(out["lo"] > 0 or out["hi"] < 0)
    return out


# --- the driver ---------------------------------------------------------------------------------------

def _finished_full(run_dir: Path) -> tuple[float, str] | None:
    """A finished full-supervision reference's headline test Dice and which it is; None when it has none yet."""
    if not (run_dir / "run.db").is_file():
        return None
    with RunStore.open_readonly(run_dir) as store:
        ev = [e for e in store.evaluations() if e["split"] == "test"]
        metric = run_headline(store)
        return (ev[0][metric], metric) if ev else None


def _recorded_curve(run_dir: Path, rounds: Sequence[dict]) -> tuple[str, list[dict]]:
    """An active run's headline metric and its curve: per finished round of ``rounds`` (status rows),
    the expert labels and the headline test Dice from the run's recorded evaluations (so a run whose
    rounds recorded another figure as their test Dice, before headlines, is still read alike)."""
    with RunStore.open_readonly(run_dir) as store:
        metric = run_headline(store)
        tests = {e["round"]: e for e in store.evaluations() if e["split"] == "test"}
    curve = []
    for r in rounds:
        ev = tests.get(r["round"])
        value = ev[metric] if ev is not None and ev[metric] is not None else r["test_dice"]
        curve.append({**r, "test_dice": value})
    return metric, curve


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


def _finished_round0(runs: Path, seed: int) -> Path | None:
    """An active run of ``seed`` (made by an earlier call, perhaps with other strategies) with round 0 done,
    preferably the one that trained it rather than one that adopted it."""
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


def _make_full(cfg: ExperimentConfig, run_dir: Path, reporter: Reporter) -> tuple[float, str]:
    """The full-supervision reference of ``cfg.seed`` (reused when finished): its headline test Dice
    and which Dice that is."""
    found = _finished_full(run_dir)
    if found is None:
        if run_dir.exists():  # an interrupted supervised run: start it again
            _remove_unfinished(RunDir(run_dir))
        reporter.note(f"full supervision, seed {cfg.seed}")
        test = train_supervised(cfg, run_dir, full=True, reporter=reporter)["test"]
        found = test["headline_dice"], test["headline"]
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


def _worker(config: ExperimentConfig, runs: Path, seed: int, strategy: str | None, threads: int, conn,
            parent: int) -> None:
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
            _make_active(cfg, strategy, runs / f"{strategy}-s{seed}", _finished_round0(runs, seed), SILENT)
    except AlsegError as exc:
        conn.send(str(exc))
    except KeyboardInterrupt:  # Ctrl-C reaches the workers too; the parent says how to resume
        conn.send("interrupted")
    conn.close()


def _make_runs_in_parallel(config: ExperimentConfig, runs: Path, seeds: Sequence[int], strategies: Sequence[str],
                           full: bool, jobs: int, reporter: Reporter) -> None:
    """Make the runs of ``seeds`` with ``jobs`` worker processes, each with cores / jobs threads.

    One process per core trains faster than one process using every core on small CPUs (1.36x on
    2 cores at quick-isic: ``benchmarks/process_split.py``) and different seeds are independent.
    A seed's round 0 is still trained once: its first strategy's run goes first, and the seed's
    other runs wait until round 0 is done there, then adopt it. Every run keeps its own writer
    lock and is resumable, so a killed study resumes with the same command. The first error stops
    the workers (what they finished is kept) and is raised here."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no forked copies of torch's thread pools
    threads = max(1, len(os.sched_getaffinity(0)) // jobs)
    # (name, seed, strategy or None for full, needs round 0 done first); trainers of round 0 first
    waiting: list[tuple[str, int, str | None, bool]] = []
    for seed in seeds:
        has_round0 = _finished_round0(runs, seed) is not None
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
                     if _finished_round0(runs, seed) is not None}
            for unit in list(waiting):
                if len(running) >= jobs:
                    break
                name, seed, strategy, after = unit
                if after and seed not in ready and running:  # nothing running: no round 0 to wait for
                    continue
                waiting.remove(unit)
                receive, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_worker, args=(config, runs, seed, strategy, threads, send, os.getpid()),
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
            jobs: int = 1, reporter: Reporter = SILENT) -> dict:
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
    _check_same_settings(runs, config, full)
    if jobs > 1:  # make every run in worker processes; the pass below then only collects them
        _make_runs_in_parallel(config, runs, made, strategies, full, jobs, reporter)
    for seed in made:
        cfg = dataclasses.replace(config, seed=seed)
        if full:
            run_dir = runs / f"full-s{seed}"
            dice, metrics[run_dir.name] = _make_full(cfg, run_dir, reporter)
            full_runs[seed] = {"test_dice": dice}
            if scorer:
                full_runs[seed]["external_dice"] = scorer.dice(run_dir.name, run_dir)
        donor = _finished_round0(runs, seed)  # else the seed's first run here trains it, the others adopt it
        for strategy in strategies:
            run_dir = runs / f"{strategy}-s{seed}"
            result = _make_active(cfg, strategy, run_dir, donor, reporter)
            donor = donor or run_dir
            with RunStore.open_readonly(run_dir) as store:
                train_sizes[seed] = len(store.split()["train"])
            metrics[run_dir.name], rounds = _recorded_curve(run_dir, result["rounds"])
            record = {"seed": seed, "rounds": rounds, "train_size": train_sizes[seed]}
            if scorer:
                record["external_dice"] = scorer.dice(run_dir.name, run_dir)
            results[strategy].append(record)
    metric = _one_metric(metrics, runs)
    if only_seeds is not None:
        return {"seeds": sorted(set(only_seeds)),
                "runs": [f"full-s{r}" for r in sorted(full_runs)]
                + [f"{name}-s{r['seed']}" for name, per_seed in results.items() for r in per_seed]}
    return _write_summary(out, summarise(results, full_runs, _mean_size(train_sizes)), preset=config.preset,
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


def merge(studies: Sequence[str | Path], out: str | Path) -> dict:
    """One summary from studies of the same settings made apart (other machines or sessions that
    could not share a folder): their ``compare.json`` files (or folders holding one), each with
    some of the seeds. The runs' curves are read from the files, so nothing is trained or read
    from run folders; the result is what one ``compare`` over all their runs would summarise, and
    is written to ``out`` as compare.json, .csv and .png.

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
            measured = {k: run.get(k) for k in ("strategy", "seed", "curve", "train_size", "test_dice", "external_dice")}
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
            full_runs[run["seed"]] = {"test_dice": run["test_dice"], **extra}
        else:
            c = run["curve"]
            results[run["strategy"]].append({"seed": run["seed"], "train_size": run["train_size"], "rounds": [
                {"expert_labelled": x, "test_dice": y} for x, y in zip(c["expert_labelled"], c["test_dice"])], **extra})
            train_sizes[run["seed"]] = run["train_size"]
    seed_list = sorted({r["seed"] for r in runs.values()})
    return _write_summary(out, summarise(results, full_runs, _mean_size(train_sizes)), preset=first["preset"],
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
    return same == {k: v for k, v in longer.items() if k not in ("curve", "external_dice")} and all(
        shorter["curve"][k] == longer["curve"][k][:n] for k in ("expert_labelled", "test_dice"))


def summarise(results: dict[str, list[dict]], full_runs: dict[int, dict], train_size: int | None) -> dict:
    """The comparison summary from the runs' rounds (pure: no files).

    ``results[strategy]`` lists per seed ``{"seed", "rounds": [{"expert_labelled", "test_dice"}, ...],
    "train_size"?, "external_dice"?}``; ``full_runs[seed] = {"test_dice", "external_dice"?}``. A strategy's curve
    keeps the rounds every seed finished; paired differences use the rounds both strategies finished.
    """
    full_dice = {seed: f["test_dice"] for seed, f in full_runs.items()}
    with_external = any("external_dice" in r for per_seed in results.values() for r in per_seed)
    out: dict = {"train_size": train_size, "strategies": {}, "runs": {},
                 "intervals": {"method": "percentile bootstrap of the mean over seeds (seeds resampled with "
                                         "replacement)", "level": LEVEL, "resamples": RESAMPLES,
                               "rng_seed": BOOTSTRAP_SEED,
                               "note": "one seed: the interval is the value itself (no spread to estimate); "
                                       "2 or 3 seeds: the interval is the range of the per-seed values"},
                 "labels_to_95pct_full_rule": "per seed, expert labels where test Dice first reaches 0.95 x that "
                                              "seed's full-supervision Dice, interpolated linearly between rounds; "
                                              "mean and interval null when any seed never reaches it",
                 "baseline": BASELINE if BASELINE in results else None}
    if full_runs:
        values = [full_dice[s] for s in sorted(full_dice)]
        fs = seed_summary(values)
        out["full_dice"] = fs["mean"]
        out["full"] = {"test_dice": fs}
        if with_external:
            out["full"]["external_dice"] = seed_summary([full_runs[s].get("external_dice") for s in sorted(full_runs)])
        for seed in sorted(full_runs):
            out["runs"][f"full-s{seed}"] = {"strategy": "full", "seed": seed, **full_runs[seed]}
    else:
        out["full_dice"], out["full"] = None, None

    def per_seed_metrics(per_seed: list[dict], n_rounds: int) -> dict:
        xs = [[float(r["rounds"][k]["expert_labelled"]) for k in range(n_rounds)] for r in per_seed]
        ys = [[float(r["rounds"][k]["test_dice"]) for k in range(n_rounds)] for r in per_seed]
        need = [labels_to_reach(x, y, 0.95 * full_dice[r["seed"]], interpolate=True) if r["seed"] in full_dice
                else None for x, y, r in zip(xs, ys, per_seed)]
        return {"x": xs, "y": ys, "final_dice": [y[-1] for y in ys], "aulc": [aulc(x, y) for x, y in zip(xs, ys)],
                "labels_to_95pct_full": need}

    rounds_done = {s: min(len(r["rounds"]) for r in per_seed) for s, per_seed in results.items()}
    for strategy, per_seed in results.items():
        if rounds_done[strategy] == 0:
            raise AlsegError(f"{strategy}: a run has no finished round to compare")
        m = per_seed_metrics(per_seed, rounds_done[strategy])
        xs, ys = np.array(m["x"]), np.array(m["y"])
        x, mean, std = xs.mean(0), ys.mean(0), ys.std(0)
        band = [bootstrap_interval(ys[:, k]) for k in range(ys.shape[1])]
        final, area = seed_summary(m["final_dice"]), seed_summary(m["aulc"])
        need = seed_summary(m["labels_to_95pct_full"]) if full_dice else None
        t = {
            "curve": {"x": x.tolist(), "mean": mean.tolist(), "std": std.tolist(), "lo": [b[0] for b in band],
                      "hi": [b[1] for b in band], "n": len(per_seed)},
            "seeds": [r["seed"] for r in per_seed],
            "final_dice": final["mean"], "final_dice_interval": [final["lo"], final["hi"]],
            "final_dice_per_seed": final["per_seed"], "final_expert_labels": float(x[-1]),
            "aulc": area["mean"], "aulc_interval": [area["lo"], area["hi"]], "aulc_per_seed": area["per_seed"],
            "labels_to_95pct_full_per_seed": m["labels_to_95pct_full"],
            "labels_to_95pct_full": need["mean"] if need else None,
            "labels_to_95pct_full_interval": [need["lo"], need["hi"]] if need and need["mean"] is not None else None,
            "labels_to_95pct_full_not_reached": ([r["seed"] for r, v in zip(per_seed, m["labels_to_95pct_full"])
                                                  if v is None] if full_dice else None),
            "dice_at_50pct_labels": dice_at(x, mean, 0.5 * train_size) if train_size else None,
        }
        if with_external:
            ext = seed_summary([r.get("external_dice") for r in per_seed])
            t.update({"external_dice": ext["mean"], "external_dice_interval": [ext["lo"], ext["hi"]],
                      "external_dice_per_seed": ext["per_seed"]})
        out["strategies"][strategy] = t
        for r, fd, a, nd in zip(per_seed, m["final_dice"], m["aulc"], m["labels_to_95pct_full"]):
            run = {"strategy": strategy, "seed": r["seed"], "rounds": len(r["rounds"]),
                   "final_expert_labels": float(r["rounds"][rounds_done[strategy] - 1]["expert_labelled"]),
                   "final_dice": fd, "aulc": a, "labels_to_95pct_full": nd,
                   "curve": {"expert_labelled": [float(k["expert_labelled"]) for k in r["rounds"]],
                             "test_dice": [float(k["test_dice"]) for k in r["rounds"]]}}
            for key in ("train_size", "external_dice"):
                if key in r:
                    run[key] = r[key]
            out["runs"][f"{strategy}-s{r['seed']}"] = run
    if BASELINE in results:
        base_by_seed = {r["seed"]: r for r in results[BASELINE]}
        for strategy, per_seed in results.items():
            if strategy == BASELINE:
                continue
            paired = [r for r in per_seed if r["seed"] in base_by_seed]
            n = min(rounds_done[strategy], rounds_done[BASELINE])
            mine = per_seed_metrics(paired, n)
            base = per_seed_metrics([base_by_seed[r["seed"]] for r in paired], n)
            out["strategies"][strategy]["vs_random"] = {
                "rounds": n, "seeds": [r["seed"] for r in paired],
                **{k: paired_differences(mine[k], base[k]) for k in ("aulc", "final_dice", "labels_to_95pct_full")}}
            if not full_dice:
                out["strategies"][strategy]["vs_random"]["labels_to_95pct_full"] = None
    return out


def _figure(figures, path: Path, preset: str, seeds: int, summary: dict, paper: float | None) -> None:
    curves = {s: t["curve"] for s, t in summary["strategies"].items()}
    full_line = None
    if summary["full"]:
        f = summary["full"]["test_dice"]
        full_line = (f["mean"], f["lo"], f["hi"])
    if seeds > 1:
        what = f"{seeds} seeds; bands: 95 % bootstrap intervals over seeds"
    else:
        what = "1 seed: no interval"
    label = HEADLINE_TEST_LABELS[summary["metric"]]
    figures.learning_curves(path, f"{preset}: {label} vs expert labels ({what})", curves,
                            train_size=summary["train_size"], full=full_line, paper=paper,
                            full_epochs=summary["settings"].get("train.full_epochs"),
                            ylabel=f"{label} (mean over seeds)")


def _csv(summary: dict, with_external: bool) -> str:
    def cell(v):
        if v is None:
            return ""
        if isinstance(v, bool):
            return str(v).lower()
        return v

    def seeds_cell(values):
        return " ".join("None" if v is None else str(v) for v in values)

    buf = io.StringIO()
    writer = csv.writer(buf)
    head = ["strategy", "labels_to_95pct_full_mean", "labels_to_95pct_full_per_seed", "dice_at_50pct_labels",
            "final_dice_mean", "final_expert_labels", "final_dice_lo", "final_dice_hi", "aulc_mean", "aulc_lo",
            "aulc_hi", "labels_to_95pct_full_lo", "labels_to_95pct_full_hi", "labels_to_95pct_full_seeds_not_reached"]
    if with_external:
        head += ["external_dice_mean", "external_dice_lo", "external_dice_hi"]
    metrics = ("aulc", "final_dice", "labels_to_95pct_full")
    for k in metrics:
        head += [f"diff_vs_random_{k}_{p}" for p in ("mean", "lo", "hi", "excludes_zero")]
    head.append("metric")  # which test Dice every Dice column is
    writer.writerow(head)
    for s, t in summary["strategies"].items():
        need_iv = t["labels_to_95pct_full_interval"] or [None, None]
        not_reached = t["labels_to_95pct_full_not_reached"]
        row = [s, t["labels_to_95pct_full"], seeds_cell(t["labels_to_95pct_full_per_seed"]), t["dice_at_50pct_labels"],
               t["final_dice"], t["final_expert_labels"], *t["final_dice_interval"], t["aulc"], *t["aulc_interval"],
               *need_iv, None if not_reached is None else " ".join(map(str, not_reached))]
        if with_external:
            row += [t["external_dice"], *t["external_dice_interval"]]
        for k in metrics:
            d = (t.get("vs_random") or {}).get(k) or {}
            row += [d.get("mean"), d.get("lo"), d.get("hi"), d.get("excludes_zero")]
        row.append(summary["metric_label"])
        writer.writerow([cell(v) for v in row])
    return buf.getvalue()
