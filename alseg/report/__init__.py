"""Reports: the paper's figures and a self-contained HTML page for a run, and strategy comparisons.

Owns ``RUN_DIR/report/``: ``index.html`` (opens offline; every figure is a PNG beside it), the
figures, and ``rounds.csv``. Everything is drawn from what the run's store recorded (scores,
selections, epochs, evaluations), so a report can be redrawn without retraining; only the
prediction panels apply the recorded checkpoints (round 0 and the last round) to a fixed set of
test images.
"""
from __future__ import annotations

import csv
import html
import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from alseg.config import config_from_dict
from alseg.errors import AlsegError
from alseg.rundata import open_run_data
from alseg.metrics import dice_per_image
from alseg.progress import SILENT, Reporter
from alseg.runtime import resolve_device
from alseg.rundir import RunDir
from alseg.store import RunStore, atomic_write_bytes, atomic_write_text, current_umask, disk_full_error
from alseg.active.strategies import CealStrategy, reason_kind
from alseg.train import Checkpoint
from alseg.active.uncertainty import mc_dropout

__all__ = ["make_report", "fixed_test_ids"]


def fixed_test_ids(test_ids, positive, n: int) -> list[str]:
    """``n`` test images spread evenly over the sorted test split, lesion-bearing ones first."""
    ids = sorted(test_ids)
    ranked = [i for i in ids if positive.get(i, True)] or ids
    if len(ranked) <= n:
        return ranked
    return [ranked[int(k)] for k in np.linspace(0, len(ranked) - 1, n).round()]


def _kind(reason: str | None, selection_kind: str) -> str:
    return "pseudo" if selection_kind == "pseudo" else reason_kind(reason)


def make_report(run_dir: str | Path, *, images: int = 4, device: str = "auto", out: str | Path | None = None,
                reporter: Reporter = SILENT) -> Path:
    """Write ``RUN_DIR/report/index.html`` (or ``OUT/index.html``) and its figures; return the HTML path.

    The run directory is only read. The report is drawn in a temporary folder beside its target and
    renamed into place when complete, so a failure (a damaged checkpoint, a full disk) leaves the
    previous report, or none, never half of one.
    """

    rundir = RunDir(run_dir).require()
    run_dir = rundir.root
    with RunStore.open_readonly(rundir) as store:
        config = config_from_dict(store.config())
        kind = store.kind()
        rounds = [r for r in store.rounds() if r["status"] == "done"]
        if not rounds and kind == "active":
            raise AlsegError("run has no finished round yet; nothing to report", run_dir)
        evaluations = {(e["round"], e["split"]): e for e in store.evaluations()}
        epochs = store.epochs()
        split = store.split()
        scores = {r["round"]: store.scores(r["round"]) for r in rounds if r["round"] > 0}
        selections = {r["round"]: {k: store.selection(r["round"], k) for k in ("expert", "pseudo")} for r in rounds}
        reasons = {r["round"]: store.selection_reasons(r["round"]) for r in rounds}
        supervised_seconds = store.supervised_seconds()
        expert_seconds = store.expert_seconds()
        facts = store.round_facts()
        data = open_run_data(store, config.data.cache_dir, reporter).data
        last = max((r["round"] for r in rounds), default=0)
        checkpoints = {0: rundir.checkpoint(0 if kind == "active" else None)}
        if kind == "active":
            checkpoints[last] = rundir.checkpoint(last)
    target = Path(out) if out is not None else rundir.report
    out = _building_folder(target)
    try:
        page = _draw(out, run_dir, config, rounds, evaluations, epochs, split, scores, selections, reasons,
                     supervised_seconds, expert_seconds, data, checkpoints, images, device, reporter, facts)
        _swap_into_place(out, target)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return target / page.name


def _building_folder(target: Path) -> Path:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    except OSError as exc:
        raise disk_full_error(exc, target.parent, "no report was written; give --out FOLDER elsewhere") or exc from None


def _swap_into_place(built: Path, target: Path) -> None:
    os.chmod(built, 0o777 & ~current_umask())
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(built, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _draw(out: Path, run_dir: Path, config, rounds, evaluations, epochs, split, scores, selections, reasons,
          supervised_seconds, expert_seconds, data, checkpoints, images, device, reporter, facts) -> Path:
    from alseg.report import figures

    made: list[tuple[str, str, str]] = []  # (section, file, caption)

    # predictions of the initial and the final model on fixed test images
    positive = {i: bool(data.positive[k]) for k, i in enumerate(data.ids)}
    ids = fixed_test_ids(split["test"] or split["val"], positive, images)  # a project has no test split
    idx = data.indices(ids)
    dev = resolve_device(device)
    passes = max(2, config.active.mc_passes)
    for round, path in checkpoints.items():
        ckpt = Checkpoint.load(path, device=dev)
        res = mc_dropout(ckpt.model, data.images, idx, ckpt.normalizer, passes=passes, device=dev, seed=0,
                         keep_maps=True, reporter=reporter)
        dice = dice_per_image(res.mean > 0.5, np.asarray(data.masks[idx]) > 0)
        name = "initial" if round == 0 else "final"
        label = "initial model (round 0)" if round == 0 else f"last round ({round})"
        f = figures.predictions(out / f"predictions-{name}.png", f"Test predictions, {label}, T = {passes} MC passes",
                                ids, np.asarray(data.images[idx]), np.asarray(data.masks[idx]), res.mean,
                                res.variance_map, dice)
        made.append(("Predictions", f.name, f"{label}: image, ground truth, MC-mean prediction (white: > 0.5), "
                                           "per-pixel MC variance."))

    # per-round uncertainty figures
    ceal = CealStrategy(config.active.ceal)
    for round in sorted(scores):
        rows = scores[round]
        if not rows:
            continue
        pool_ids = list(rows)
        values = np.array([rows[i]["variance"] for i in pool_ids])
        chosen = {i: _kind(reasons[round].get(i), "expert") for i in selections[round]["expert"]}
        chosen.update({i: "pseudo" for i in selections[round]["pseudo"]})
        kinds = [chosen.get(i) for i in pool_ids]
        if all(rows[i]["dice"] is not None for i in pool_ids):
            dice = np.array([rows[i]["dice"] for i in pool_ids])
            f = figures.uncertainty_vs_dice(out / f"uncertainty-vs-dice-round-{round:02d}.png", round, values, dice, kinds)
            made.append(("Uncertainty vs Dice", f.name, f"Round {round}: pool images scored by the round-{round - 1} model."))
        regions = ceal.regions(values) if config.active.strategy == "ceal" else {}
        f = figures.score_histogram(out / f"histogram-round-{round:02d}.png", round, values, kinds,
                                    bins=config.active.ceal.bins, regions=regions)
        made.append(("Score histograms", f.name, f"Round {round}: the pool's uncertainty scores and who was chosen."))

    # training curves
    initial = [e for e in epochs if e["phase"] == "initial"]
    active = [e for e in epochs if e["phase"] == "active"]
    if initial:
        f = figures.training_curves(out / "training-initial.png", "Initial training: Dice per epoch", initial)
        made.append(("Training", f.name, "Initial phase on the initial labelled set."))
    if active:
        f = figures.training_curves(out / "training-active.png", "Active-learning phase: Dice per epoch", active,
                                    round_epochs=True)
        made.append(("Training", f.name, "Retraining in each round (warm start unless configured otherwise)."))

    # learning curve and table
    table = []
    for r in rounds or [{"round": 0, "expert_labelled": len(split["labelled"]), "pseudo_labelled": 0,
                         "pool": len(split["pool"]), "seconds": supervised_seconds}]:
        ev = evaluations.get((r["round"], "test"), {})
        table.append({"round": r["round"], "expert_labelled": r["expert_labelled"], "pseudo_labelled": r["pseudo_labelled"],
                      "pool": r["pool"], "mean_dice": ev.get("mean_dice"), "median_dice": ev.get("median_dice"),
                      "pooled_dice": ev.get("pooled_dice"), "volume_dice_mean": ev.get("volume_dice_mean"),
                      "val_dice": r.get("val_dice"), "seconds": r["seconds"],
                      "expert_minutes": expert_seconds.get(r["round"], 0.0) / 60})
    if len(table) > 1:
        curve = {config.active.strategy: {"x": [t["expert_labelled"] for t in table],
                                          "mean": [t["mean_dice"] for t in table], "std": [0.0] * len(table)}}
        f = figures.learning_curves(out / "learning-curve.png", "Learning curve: test Dice vs expert labels", curve,
                                    train_size=len(split["train"]))
        made.append(("Learning curve", f.name, "Test Dice after each round against the expert-labelled images."))
    _write_csv(out / "rounds.csv", table)
    page = _html(run_dir, config, split, made, table, _gate_rows(rounds, facts))
    atomic_write_text(out / "index.html", page)
    return out / "index.html"


def _gate_rows(rounds: list[dict], facts: dict) -> list[dict]:
    """Per finished round: its model against a constant mask on validation, and the pseudo-label gate
    that the round's selection met (recorded by the loop; rounds from before they were recorded are
    left out)."""
    rows = []
    for r in rounds:
        model, gate = facts.get(r["round"], {}).get("model"), facts.get(r["round"], {}).get("gate")
        if model is None and gate is None:
            continue
        rows.append({"round": r["round"], "val_dice": model and model["val_dice"],
                     "constant_dice": model and model["constant_dice"],
                     "useful": None if model is None else ("yes" if model["useful"] else "no"),
                     "asked": gate and gate["asked"], "taken": gate and gate["taken"],
                     "reason": gate["reason"] if gate else "–"})
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def _fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _html(run_dir: Path, config, split: dict, made: list[tuple[str, str, str]], table: list[dict],
          gates: list[dict]) -> str:
    e = html.escape
    gate_table = ""
    if gates:
        gate_head = "".join(f"<th>{e(h)}</th>" for h in ("round", "val Dice", "constant mask", "useful",
                                                           "pseudo-labels asked", "taken", "why"))
        gate_body = "".join("<tr>" + "".join(f"<td>{e(_fmt(g[k]))}</td>" for k in g) + "</tr>" for g in gates)
        gate_table = (
            "<h2>The model and its pseudo-labels</h2><p>Each round's model against the better constant mask "
            "(all background or all foreground) on the validation images: a model that does not beat it by "
            "0.05 is not useful, exports no head start and takes no pseudo-labels. Pseudo-labels are drawn by "
            "the previous round's model only when that model passed the gate, and never more than the stated "
            f"share of the pool.</p><table><tr>{gate_head}</tr>{gate_body}</table>")
    head = ("<tr>" + "".join(f"<th>{e(h)}</th>" for h in ("round", "expert-labelled", "pseudo-labelled", "pool",
            "test Dice mean", "median", "pooled", "per-volume", "val Dice", "seconds", "expert minutes")) + "</tr>")
    rows = "".join("<tr>" + "".join(f"<td>{_fmt(t[k])}</td>" for k in t) + "</tr>" for t in table)
    sections = []
    for section in dict.fromkeys(s for s, _, _ in made):
        figs = "".join(f'<figure><img src="{e(f)}" alt="{e(c)}"><figcaption>{e(c)}</figcaption></figure>'
                       for s, f, c in made if s == section)
        sections.append(f"<h2>{e(section)}</h2>{figs}")
    a = config.active
    facts = (f"preset <b>{e(config.preset)}</b>, strategy <b>{e(a.strategy)}</b>, seed {config.seed}; "
             f"data {e(str(config.data.path))} at {config.data.size} px; U-Net width {config.model.width}, depth "
             f"{config.model.depth}, dropout {config.model.dropout}; split by {e(split['split_by'])}: train "
             f"{len(split['train'])} (labelled {len(split['labelled'])}), val {len(split['val'])}, test {len(split['test'])}; "
             f"T = {a.mc_passes} MC passes; {a.round_epochs} epochs per round, at least "
             f"{config.train.min_epoch_steps} optimiser steps an epoch; self-supervised pre-training "
             f"{'(' + config.pretrain.method + ')' if config.pretrain.enabled else 'off'}.")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>alseg report: {e(run_dir.name)}</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f3f3f3; }} figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }}
figcaption {{ color: #555; font-size: 0.9em; }}
</style></head><body>
<h1>alseg report: {e(run_dir.name)}</h1>
<p>{facts}</p>
<h2>Rounds</h2>
<p>Test Dice per round (deterministic prediction, dropout off; empty mask and empty prediction score 1),
the best validation Dice of the round's training, and the minutes the expert spent labelling on the review page.
Also in <a href="rounds.csv">rounds.csv</a>.</p>
<table>{head}{rows}</table>
{gate_table}
{''.join(sections)}
<p><small>Made by alseg from the run's store; figures are PNG files beside this page.</small></p>
</body></html>
"""
