"""Reports: the paper's figures and a self-contained HTML page for a run or a lab's project.

Owns ``RUN_DIR/report/``: ``index.html`` (opens offline; every figure is a PNG beside it), the
figures, ``rounds.csv`` and, where a person labels, ``effort.csv``. Everything is drawn from what
the run's store recorded (scores, selections, epochs, evaluations, the expert's annotations), so a
report can be redrawn without retraining; only the prediction panels apply the recorded
checkpoints (round 0 and the last round) to a fixed set of images.

Each figure says which split it shows. A run with a test split plots its headline test Dice per
round (:func:`alseg.evaluate.headline_metric`: "per-volume test Dice (Buda et al.)" when the test
split holds whole volumes, else "per-image test Dice"; axis, legend and table say which) with the
validation Dice (per image, as training measures it) dashed beside it; a project has no test
split, so its learning curve and its prediction panels are on the validation images, and say so.
A project's report also has the expert's effort per round and selection reason
(:func:`expert_effort`) and, when two annotators labelled one image, their agreement.
"""
from __future__ import annotations

import csv
import html
import io
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alseg.config import config_from_dict
from alseg.data.cache import mask_to_size
from alseg.errors import AlsegError
from alseg.evaluate import HEADLINE_TEST_LABELS, run_headline
from alseg.rundata import open_run_data
from alseg.metrics import dice_per_image
from alseg.progress import SILENT, Reporter
from alseg.runtime import resolve_device
from alseg.rundir import RunDir
from alseg.store import RunStore, atomic_write_bytes, atomic_write_text, current_umask, disk_full_error
from alseg.active.strategies import CealStrategy, make_strategy, reason_kind, reason_label
from alseg.train import Checkpoint
from alseg.active.uncertainty import mc_dropout

__all__ = ["make_report", "fixed_test_ids", "expert_effort", "annotator_agreement", "EFFORT_COLUMNS"]


def fixed_test_ids(test_ids, positive, n: int) -> list[str]:
    """``n`` test images spread evenly over the sorted test split, lesion-bearing ones first."""
    ids = sorted(test_ids)
    ranked = [i for i in ids if positive.get(i, True)] or ids
    if len(ranked) <= n:
        return ranked
    return [ranked[int(k)] for k in np.linspace(0, len(ranked) - 1, n).round()]


def _kind(reason: str | None, selection_kind: str) -> str:
    return "pseudo" if selection_kind == "pseudo" else reason_kind(reason)


@dataclass
class Recorded:
    """What the report reads from a run's store, in one read-only pass."""

    config: object
    kind: str
    annotator: str
    rounds: list[dict]
    evaluations: dict
    epochs: list[dict]
    split: dict
    scores: dict
    selections: dict
    reasons: dict
    supervised_seconds: float | None
    expert_seconds: dict
    facts: dict
    val_images: int
    effort: list[dict] = field(default_factory=list)
    agreement: dict | None = None
    headline: str = "mean_dice"  # the test figure the run reports (alseg.evaluate.headline_metric)
    test_volumes: int = 0  # volumes (groups) in the test split

    @property
    def has_test(self) -> bool:
        return bool(self.split["test"])

    @property
    def per_volume(self) -> bool:
        return self.headline == "volume_dice_mean"


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
        split = store.split()
        annotator = store.annotator()
        rec = Recorded(
            config=config, kind=kind, annotator=annotator, rounds=rounds,
            evaluations={(e["round"], e["split"]): e for e in store.evaluations()}, epochs=store.epochs(),
            split=split, scores={r["round"]: store.scores(r["round"]) for r in rounds if r["round"] > 0},
            selections={r["round"]: {k: store.selection(r["round"], k) for k in ("expert", "pseudo")} for r in rounds},
            reasons={r["round"]: store.selection_reasons(r["round"]) for r in rounds},
            supervised_seconds=store.supervised_seconds(), expert_seconds=store.expert_seconds(),
            facts=store.round_facts(), val_images=len(split["val"]),
            effort=expert_effort(store) if annotator != "simulated" else [],
            agreement=annotator_agreement(store) if annotator != "simulated" else None,
            headline=run_headline(store))
        data = open_run_data(store, config.data.cache_dir, reporter).data
        rec.test_volumes = len({data.groups[k] for k in data.indices(split["test"])} - {None})
        # predictions on fixed images of the test split, or of validation for a project (it has no test split)
        positive = {i: bool(data.positive[k]) for k, i in enumerate(data.ids)}
        shown = fixed_test_ids(split["test"] or split["val"], positive, images)
        truths = _truths(store, data, shown)
        last = max((r["round"] for r in rounds), default=0)
        checkpoints = {0: rundir.checkpoint(0 if kind == "active" else None)}
        if kind == "active":
            checkpoints[last] = rundir.checkpoint(last)
    target = Path(out) if out is not None else rundir.report
    out = _building_folder(target)
    try:
        page = _draw(out, run_dir, rec, data, shown, truths, checkpoints, device, reporter)
        _swap_into_place(out, target)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return target / page.name


def _truths(store: RunStore, data, ids: list[str]) -> np.ndarray:
    """Working-size true masks of ``ids``: the dataset's, or the expert's stored mask for an image the
    expert labelled (a project's validation images can come from the first batch)."""
    idx = data.indices(ids)
    out = np.asarray(data.masks[idx]).copy()
    origins = store.origins(ids) if ids else {}
    for k, i in enumerate(ids):
        if origins.get(i) == "expert":
            mask = store.mask(i)
            if mask is not None:
                out[k] = mask_to_size(mask, data.size)
    return out


EFFORT_COLUMNS = ("round", "reason", "images", "versions", "seconds", "active_seconds", "strokes", "clicks",
                  "changed_prediction_sum", "changed_prediction_median", "compared_with_prediction", "accepted_as_is")
# the report's names for effort_by_round's keys where they differ (the figures' data contract names them so)
_EFFORT_SOURCE = {"changed_prediction_sum": "pixels_changed_from_prediction",
                  "changed_prediction_median": "median_pixels_changed_from_prediction"}


def expert_effort(store: RunStore) -> list[dict]:
    """The expert's effort per round and selection reason, as the report shows it and writes it to
    ``effort.csv`` (:data:`EFFORT_COLUMNS`; None where nothing was measured), from
    :meth:`RunStore.effort_by_round`."""
    return [{k: r.get(_EFFORT_SOURCE.get(k, k)) for k in EFFORT_COLUMNS} for r in store.effort_by_round()]


def annotator_agreement(store: RunStore) -> dict | None:
    """Dice between two annotators' masks of the same images: ``{count, mean_dice, rows}``, or None when
    no image has a second reading (:meth:`RunStore.agreement`)."""
    found = store.agreement()
    return {"count": found["count"], "mean_dice": found["mean_dice"], "rows": found["images"]} if found["count"] else None


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


def _draw(out: Path, run_dir: Path, rec: Recorded, data, shown: list[str], truths: np.ndarray, checkpoints: dict,
          device: str, reporter: Reporter) -> Path:
    from alseg.report import figures

    config, split = rec.config, rec.split
    made: list[tuple[str, str, str]] = []  # (section, file, caption)

    # predictions of the initial and the final model on fixed images
    shown_split = "test" if rec.has_test else "validation"
    idx = data.indices(shown)
    dev = resolve_device(device)
    passes = max(2, config.active.mc_passes)
    for round, path in checkpoints.items():
        ckpt = Checkpoint.load(path, device=dev)
        res = mc_dropout(ckpt.model, data.images, idx, ckpt.normalizer, passes=passes, device=dev, seed=0,
                         keep_maps=True, reporter=reporter)
        dice = dice_per_image(res.mean > 0.5, truths > 0)
        name = "initial" if round == 0 else "final"
        label = "initial model (round 0)" if round == 0 else f"model of the last round ({round})"
        title = f"Predictions on {shown_split} images, round {round}" + (
            " (initial model)" if round == 0 else " (last round)") + f", T = {passes} MC passes"
        f = figures.predictions(out / f"predictions-{name}.png", title, shown, np.asarray(data.images[idx]), truths,
                                res.mean, res.variance_map, dice)
        seen = ("" if rec.has_test else " These are validation images: the project has no test split, and the "
                "checkpoint was chosen on them, so their Dice flatters the model.")
        made.append(("Predictions", f.name, f"{label} on {len(shown)} fixed {shown_split} images: image, ground "
                                            f"truth, MC-mean prediction (white: > 0.5), per-pixel MC variance.{seen}"))

    # per-round uncertainty figures
    strategy = make_strategy(config.active.strategy, config.active.ceal, config.active.batch_size)
    for round in sorted(rec.scores):
        rows = rec.scores[round]
        if not rows:
            continue
        pool_ids = list(rows)
        values = np.array([rows[i]["variance"] for i in pool_ids])
        chosen = {i: _kind(rec.reasons[round].get(i), "expert") for i in rec.selections[round]["expert"]}
        chosen.update({i: "pseudo" for i in rec.selections[round]["pseudo"]})
        kinds = [chosen.get(i) for i in pool_ids]
        if all(rows[i]["dice"] is not None for i in pool_ids):
            dice = np.array([rows[i]["dice"] for i in pool_ids])
            f = figures.uncertainty_vs_dice(out / f"uncertainty-vs-dice-round-{round:02d}.png", round, values, dice, kinds)
            made.append(("Uncertainty vs Dice", f.name, f"Round {round}: pool images scored by the round-{round - 1} "
                                                        "model, against their true masks (simulated annotator)."))
        # CEAL's regions on any strategy that selects as CEAL does (ceal, ceal-no-pseudo); the
        # pseudo-label bin only where the strategy takes pseudo-labels
        regions = strategy.regions(values) if isinstance(strategy, CealStrategy) else {}
        if not strategy.pseudo_wanted(round):
            regions.pop("pseudo", None)
        f = figures.score_histogram(out / f"histogram-round-{round:02d}.png", round, values, kinds,
                                    bins=config.active.ceal.bins, regions=regions)
        made.append(("Score histograms", f.name, f"Round {round}: the pool's uncertainty scores and who was chosen."))

    # training curves
    initial = [e for e in rec.epochs if e["phase"] == "initial"]
    active = [e for e in rec.epochs if e["phase"] == "active"]
    val_n = rec.val_images or None
    if initial:
        f = figures.training_curves(out / "training-initial.png", "Initial training (round 0): train and validation "
                                    "Dice per epoch", initial, val_images=val_n)
        made.append(("Training", f.name, "Initial phase on the initial labelled set; validation Dice on the "
                                         f"{rec.val_images} validation images."))
    if active:
        f = figures.training_curves(out / "training-active.png", "Active-learning rounds: train and validation Dice "
                                    "per epoch", active, round_epochs=True, val_images=val_n)
        made.append(("Training", f.name, "Retraining in each round (warm start unless configured otherwise)."))

    # learning curve and table
    table = []
    for r in rec.rounds or [{"round": 0, "expert_labelled": len(split["labelled"]), "pseudo_labelled": 0,
                             "pool": len(split["pool"]), "seconds": rec.supervised_seconds}]:
        ev = rec.evaluations.get((r["round"], "test"), {})
        table.append({"round": r["round"], "expert_labelled": r["expert_labelled"], "pseudo_labelled": r["pseudo_labelled"],
                      "pool": r["pool"], "mean_dice": ev.get("mean_dice"), "median_dice": ev.get("median_dice"),
                      "pooled_dice": ev.get("pooled_dice"), "volume_dice_mean": ev.get("volume_dice_mean"),
                      "val_dice": r.get("val_dice"), "seconds": r["seconds"],
                      "expert_minutes": rec.expert_seconds.get(r["round"], 0.0) / 60})
    if rec.rounds:
        f, caption = _learning_curve(out, rec, table, figures)
        made.append(("Learning curve", f.name, caption))

    # the expert's effort (a person labels; the simulated annotator spends none)
    if rec.effort:
        atomic_write_bytes(out / "effort.csv", _csv_bytes(rec.effort))
        if any((r.get("images") or 0) > 0 or (r.get("seconds") or 0) > 0 for r in rec.effort):
            f = figures.expert_effort(out / "expert-effort.png", "The expert's effort per round, by selection reason",
                                      rec.effort)
            made.append(("The expert's effort", f.name, "Minutes on the review page, images labelled, mask versions "
                                                        "and pixels changed from the model's predicted mask, per round; "
                                                        "the table above gives the numbers."))
    _write_csv(out / "rounds.csv", table)
    page = _html(run_dir, rec, made, table, _gate_rows(rec.rounds, rec.facts))
    atomic_write_text(out / "index.html", page)
    return out / "index.html"


def _learning_curve(out: Path, rec: Recorded, table: list[dict], figures) -> tuple[Path, str]:
    """Test Dice after each round with validation Dice dashed beside it, or validation Dice alone
    for a run without a test split (a project); the caption says which."""
    val_n = _val_images(rec)
    test_rounds = [(t["round"], "test") in rec.evaluations for t in table]
    test_n = max((rec.evaluations[(t["round"], "test")]["images"] or 0 for t, has in zip(table, test_rounds) if has),
                 default=None)
    common = dict(labelled=[t["expert_labelled"] for t in table], rounds=[t["round"] for t in table],
                  val=[t["val_dice"] for t in table], val_images=val_n, train_size=len(rec.split["train"]))
    if any(test_rounds) and rec.per_volume:
        label = HEADLINE_TEST_LABELS[rec.headline]
        f = figures.run_learning_curve(out / "learning-curve.png", f"Learning curve: {label} (validation per image, "
                                       "dashed) vs expert-labelled images", test=[t[rec.headline] for t in table],
                                       test_label=f"{label}, {rec.test_volumes} "
                                       f"volume{'s' * (rec.test_volumes != 1)}",
                                       ylabel=f"{label}; validation per image", **common)
        caption = (f"After each round against the expert-labelled images: the mean Dice of the {rec.test_volumes} "
                   f"test volumes, each scored as one 3D mask over all its slices ({test_n} in all), tumour-free "
                   f"ones included (Buda et al.; solid), and the mean Dice of the {val_n} validation images "
                   "(dashed; per image, the best epoch's, which chose the checkpoint).")
    elif any(test_rounds):
        f = figures.run_learning_curve(out / "learning-curve.png", "Learning curve: test Dice (validation dashed) vs "
                                       "expert-labelled images", test=[t[rec.headline] for t in table],
                                       test_images=test_n, ylabel=f"{HEADLINE_TEST_LABELS[rec.headline]} "
                                       "(mean over images)", **common)
        caption = (f"Mean Dice after each round against the expert-labelled images: on the {test_n} test images "
                   f"(solid) and on the {val_n} validation images (dashed; the best epoch's, which chose the "
                   "checkpoint, so it reads higher).")
    else:
        f = figures.run_learning_curve(out / "learning-curve.png", "Learning curve: validation Dice vs "
                                       "expert-labelled images", **common)
        caption = (f"No test split (a project keeps every masked image for training and validation), so this is "
                   f"each round's validation Dice on {val_n} images against the expert-labelled images: the best "
                   "epoch's, the one that chose the round's checkpoint, so it reads higher than a held-out test "
                   "set would.")
    return f, caption


def _val_images(rec: Recorded) -> int:
    """How many validation images the rounds' validation Dice is the mean of (as the loop recorded it)."""
    counts = [(rec.facts.get(r["round"], {}).get("model") or {}).get("val_images") for r in rec.rounds]
    counts = [c for c in counts if c]
    return max(counts) if counts else rec.val_images


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


def _csv_bytes(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def _write_csv(path: Path, rows: list[dict]) -> None:
    atomic_write_bytes(path, _csv_bytes(rows))


def _fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


_TEST_COLUMNS = ("mean_dice", "median_dice", "pooled_dice", "volume_dice_mean")
_ROUND_HEADERS = {"round": "round", "expert_labelled": "expert-labelled", "pseudo_labelled": "pseudo-labelled",
                  "pool": "pool", "mean_dice": f"{HEADLINE_TEST_LABELS['mean_dice']} mean", "median_dice": "median",
                  "pooled_dice": "pooled", "volume_dice_mean": "per-volume", "val_dice": "val Dice (best epoch)",
                  "seconds": "seconds", "expert_minutes": "expert minutes"}
# a run whose test split holds whole volumes: the per-volume figure is the headline, the rest per slice
_VOLUME_HEADERS = {**_ROUND_HEADERS, "volume_dice_mean": HEADLINE_TEST_LABELS["volume_dice_mean"],
                   "mean_dice": "per-slice Dice mean", "median_dice": "per-slice median",
                   "pooled_dice": "pooled over slices"}


def _round_columns(rec: Recorded, table: list[dict]) -> list[str]:
    """The rounds table's columns: no test columns without a test split; the headline first of them."""
    columns = [k for k in table[0] if rec.has_test or k not in _TEST_COLUMNS]
    if rec.per_volume and rec.has_test:
        columns.remove(rec.headline)
        columns.insert(columns.index("mean_dice"), rec.headline)
    return columns
_EFFORT_HEADERS = (("round", "round"), ("reason", "selection reason"), ("images", "images labelled"),
                   ("versions", "mask versions"), ("seconds", "minutes (wall)"), ("active_seconds", "active minutes"),
                   ("strokes", "strokes"), ("clicks", "clicks"), ("changed_prediction_sum", "pixels changed from "
                   "prediction"), ("changed_prediction_median", "median per image"),
                   ("compared_with_prediction", "images with a prediction"),
                   ("accepted_as_is", "accepted as predicted"))
_SUMMED = ("images", "versions", "seconds", "active_seconds", "strokes", "clicks", "changed_prediction_sum",
           "compared_with_prediction", "accepted_as_is")


def _effort_cell(key: str, value) -> str:
    if value is None:
        return "–"
    if key == "reason":
        return reason_label(value)
    if key in ("seconds", "active_seconds"):
        return f"{value / 60:.1f}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _effort_html(rec: Recorded, figure: str) -> str:
    """The expert's effort table (one row per round and selection reason, and the total), the
    agreement between annotators when two labelled one image, and the effort figure."""
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for _, h in _EFFORT_HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{e(_effort_cell(k, r.get(k)))}</td>" for k, _ in _EFFORT_HEADERS) + "</tr>"
                   for r in rec.effort)
    total = {k: (None if all(r.get(k) is None for r in rec.effort) else sum(r.get(k) or 0 for r in rec.effort))
             for k in _SUMMED}
    body += ("<tr><th>all</th><th></th>" + "".join(f"<th>{e(_effort_cell(k, total.get(k)))}</th>"
                                                  for k, _ in _EFFORT_HEADERS[2:]) + "</tr>")
    agreement = ""
    a = rec.agreement
    if a:
        images = "1 image was" if a["count"] == 1 else f"{a['count']} images were"
        agreement = (f"<h3>Annotator agreement</h3><p>{images} labelled by two annotators; the mean Dice between "
                     f"the owner's mask and the second reading is <b>{_fmt(a['mean_dice'])}</b>.</p>")
        keys = list(a["rows"][0])
        agreement += ("<table><tr>" + "".join(f"<th>{e(k.replace('_', ' '))}</th>" for k in keys) + "</tr>"
                      + "".join("<tr>" + "".join(f"<td>{e(_fmt(r.get(k)))}</td>" for k in keys) + "</tr>"
                                for r in a["rows"]) + "</table>")
    return (f"<h2>The expert's effort</h2><p>Per round and selection reason: the images the expert labelled, the mask "
            "versions stored (a correction adds one), the minutes the review page was open on them (wall) and spent "
            "drawing (active), and how much of the model's predicted mask was changed or accepted as it was. "
            "Files ingested from a folder carry no time. Also in <a href=\"effort.csv\">effort.csv</a>.</p>"
            f"<table><tr>{head}</tr>{body}</table>{agreement}{figure}")


def _html(run_dir: Path, rec: Recorded, made: list[tuple[str, str, str]], table: list[dict],
          gates: list[dict]) -> str:
    e = html.escape
    config, split = rec.config, rec.split
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
    columns = _round_columns(rec, table)
    headers = _VOLUME_HEADERS if rec.per_volume else _ROUND_HEADERS
    head = "<tr>" + "".join(f"<th>{e(headers[k])}</th>" for k in columns) + "</tr>"
    rows = "".join("<tr>" + "".join(f"<td>{_fmt(t[k])}</td>" for k in columns) + "</tr>" for t in table)
    figure_html = {section: "".join(f'<figure><img src="{e(f)}" alt="{e(c)}"><figcaption>{e(c)}</figcaption></figure>'
                                    for s, f, c in made if s == section)
                   for section in dict.fromkeys(s for s, _, _ in made)}
    effort = _effort_html(rec, figure_html.pop("The expert's effort", "")) if rec.effort else ""
    first = ("Learning curve", "Predictions")  # what the run shows, before how it got there
    order = sorted(figure_html, key=lambda section: first.index(section) if section in first else len(first))
    sections = [f"<h2>{e(section)}</h2>{figure_html[section]}" for section in order]
    a = config.active
    facts = (f"preset <b>{e(config.preset)}</b>, strategy <b>{e(a.strategy)}</b>, seed {config.seed}; "
             f"data {e(str(config.data.path))} at {config.data.size} px; U-Net width {config.model.width}, depth "
             f"{config.model.depth}, dropout {config.model.dropout}; split by {e(split['split_by'])}: train "
             f"{len(split['train'])} (labelled {len(split['labelled'])}), val {len(split['val'])}, test {len(split['test'])}; "
             f"T = {a.mc_passes} MC passes; {a.round_epochs} epochs per round, at least "
             f"{config.train.min_epoch_steps} optimiser steps an epoch; self-supervised pre-training "
             f"{'(' + config.pretrain.method + ')' if config.pretrain.enabled else 'off'}.")
    if rec.has_test and rec.per_volume:
        about = (f"Per-volume test Dice per round, the headline: the mean over the {rec.test_volumes} test volumes "
                 "of each volume's Dice, its slices stacked into one 3D mask, tumour-free slices included (Buda et "
                 "al.; deterministic prediction, dropout off; an empty volume predicted empty scores 1); beside it "
                 "the Dice per slice (mean, median, pooled), the best validation Dice of the round's training (per "
                 "image), and the minutes the expert spent labelling on the review page.")
    elif rec.has_test:
        about = ("Per-image test Dice per round (deterministic prediction, dropout off; empty mask and empty "
                 "prediction score 1), the best validation Dice of the round's training, and the minutes the "
                 "expert spent labelling on the review page.")
    else:
        about = (f"This run has no test split (a project keeps every masked image for training and validation), so "
                 f"its only Dice is the best validation Dice of each round's training, on {_val_images(rec)} images; "
                 "and the minutes the expert spent labelling on the review page.")
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
<p>{about} Also in <a href="rounds.csv">rounds.csv</a>.</p>
<table>{head}{rows}</table>
{gate_table}
{effort}
{''.join(sections)}
<p><small>Made by alseg from the run's store; figures are PNG files beside this page.</small></p>
</body></html>
"""
