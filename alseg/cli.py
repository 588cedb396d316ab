"""The ``alseg`` command line: arguments, progress bars, tables and one-line errors.

A thin layer over the Python API: every command calls one public function and renders its
result. :class:`~alseg.errors.AlsegError` becomes ``alseg: error: FILE: PROBLEM`` on stderr with
exit status 2; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import json
import sqlite3
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from alseg.errors import AlsegError
from alseg.progress import Reporter, TeeReporter

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cost-effective active learning (CEAL) for biomedical image segmentation.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect datasets.")
model_app = typer.Typer(no_args_is_help=True, help="Inspect the U-Net.")
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")

out = Console()
err = Console(stderr=True)


class Format(str, Enum):
    isic2017 = "isic2017"
    lgg = "lgg"
    folder = "folder"
    nifti = "nifti"
    dicom = "dicom"


class PresetName(str, Enum):
    paper_isic = "paper-isic"
    paper_lgg = "paper-lgg"
    quick_isic = "quick-isic"
    quick_lgg = "quick-lgg"
    quick_lgg_volume = "quick-lgg-volume"
    demo = "demo"


# the selection rules for grouped data, the same on `run` and `init`
VOLUME_SELECTION = typer.Option(None, "--volume-selection", help="Grouped data (volumes, patients): slices (default: "
                                "wherever they are) or volumes (the best slices of the few volumes whose slices "
                                "score highest).")
VOLUME_SCORE = typer.Option(None, "--volume-score", help="How --volume-selection volumes ranks a volume: mean "
                            "(default) or top3 of its slices' scores.")
MAX_PER_VOLUME = typer.Option(None, "--max-per-volume", help="At most this many expert slices of one volume a round "
                              "(default: none; volumes mode: a third of the batch).")


class RichReporter(Reporter):
    """Progress bars on stderr (so ``--json`` stdout stays clean); silent when ``quiet``."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.progress: Progress | None = None

    def stage(self, name, total):
        if self.quiet:
            return lambda done: None
        self.end_stage()
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True)
        self.progress.start()
        task = self.progress.add_task(name, total=total)
        return lambda done: self.progress.update(task, completed=done)

    def end_stage(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def epoch(self, phase, round, record):
        if not self.quiet:
            val = "-" if record.get("val_dice") is None else f"{record['val_dice']:.3f}"
            err.print(f"{phase} round {round} epoch {record['epoch']:>3}: loss {record['train_loss']:.3f}  "
                      f"train Dice {record['train_dice']:.3f}  val Dice {val}  ({record['seconds']:.1f} s)")

    def note(self, text):
        if not self.quiet:  # markup off: file names may hold [brackets]
            err.print(f"note: {text}", markup=False, highlight=False)


def _emit(result, as_json: bool, render) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    else:
        render(result)


def _kv_table(title: str, rows: dict) -> Table:
    table = Table(title=title, show_header=False)
    for k, v in rows.items():
        table.add_row(str(k), f"{v:.4f}" if isinstance(v, float) else str(v))
    return table


@data_app.command("summary")
def data_summary(path: Path = typer.Argument(..., help="Dataset folder (layout detected unless --format)."),
                 format: Optional[Format] = typer.Option(None, "--format", help="Override layout detection."),
                 as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")):
    """Count samples, masks, non-empty masks, groups and image sizes; every mask is validated."""
    from alseg.data import open_dataset, summarize

    result = summarize(open_dataset(path, format.value if format else None))
    _emit(result, as_json, lambda r: out.print(_kv_table(f"{path}", r)))


@model_app.command("summary")
def model_summary(width: int = typer.Option(64, help="Base width w (channels of the first level)."),
                  depth: int = typer.Option(5, help="Encoder levels."),
                  in_channels: int = typer.Option(3, help="Input channels."),
                  dropout: float = typer.Option(0.1, help="Dropout rate."),
                  norm: str = typer.Option("none", help="none, batch, instance or group."),
                  as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")):
    """Parameter count of the U-Net at the given size (31,031,745 for the paper's)."""
    from alseg.model import ModelConfig, UNet, count_parameters

    cfg = ModelConfig(in_channels=in_channels, width=width, depth=depth, dropout=dropout, norm=norm)
    result = {"parameters": count_parameters(UNet(cfg)), **cfg.to_dict()}
    _emit(result, as_json, lambda r: out.print(_kv_table("U-Net", {**r, "parameters": f"{r['parameters']:,}"})))


def _default_out(prefix: str) -> Path:
    import time

    return Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


@app.command()
def train(data: Path = typer.Option(..., "--data", help="Dataset folder."),
          format: Optional[Format] = typer.Option(None, "--format", help="Override layout detection."),
          preset: Optional[PresetName] = typer.Option(None, help="Settings preset (default: quick-* for the layout; "
                                             "for a plain folder chosen by its images, and printed)."),
          config: Optional[Path] = typer.Option(None, "--config", help="YAML file overriding the preset."),
          size: Optional[int] = typer.Option(None, help="Working size in pixels (square)."),
          width: Optional[int] = typer.Option(None, help="U-Net base width."),
          min_epoch_steps: Optional[int] = typer.Option(None, "--min-epoch-steps", help="At least this many "
                                                           "optimiser steps an epoch, however few the labelled images "
                                                           "(default: the preset's; 0: one pass an epoch)."),
          epochs: Optional[int] = typer.Option(None, help="Training epochs (with --full: the full-supervision "
                                               "reference's, train.full_epochs in a --config)."),
          batch_size: Optional[int] = typer.Option(None, help="Images per batch."),
          lr: Optional[float] = typer.Option(None, help="Adam learning rate."),
          dropout: Optional[float] = typer.Option(None, help="Dropout rate."),
          split_by: Optional[str] = typer.Option(None, help="group (default: no patient in two splits) or sample."),
          full: bool = typer.Option(False, "--full", help="Train on the whole train split, not its 37.5 % labelled part."),
          seed: Optional[int] = typer.Option(None, help="Random seed."),
          device: Optional[str] = typer.Option(None, help="auto, cpu or cuda."),
          precision: Optional[str] = typer.Option(None, help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16."),
          out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory to create (default runs/train-TIME)."),
          cache_dir: Optional[Path] = typer.Option(None, help="Decoded-pixel cache (default ~/.cache/alseg)."),
          as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.")):
    """Supervised training on a split's labelled part, then Dice on its test split."""
    from alseg.config import build_config, choose_preset
    from alseg.data import detect_format
    from alseg.experiment import train_supervised

    fmt = format.value if format else detect_format(data)
    name, sized, why = choose_preset(preset.value if preset else None, data, fmt)
    cfg = build_config(name, config, defaults=sized, overrides={
        "seed": seed,
        "data": {"path": str(data), "format": fmt, "size": size, "split_by": split_by,
                 "cache_dir": str(cache_dir) if cache_dir else None},
        "model": {"width": width, "dropout": dropout},
        "train": {"full_epochs" if full else "epochs": epochs, "batch_size": batch_size, "lr": lr, "device": device,
                  "min_epoch_steps": min_epoch_steps,
                  "precision": precision},
    })
    result = train_supervised(cfg, out_dir or _default_out("train"), full=full, reporter=RichReporter(quiet=as_json),
                              notes=() if preset else (f"preset {name}: {why}",))

    def render(r):
        out.print(_kv_table("test Dice", r["test"]))
        out.print(f"labelled {r['labelled']}, split {r['split']} (by {r['split_by']}); best epoch {r['best_epoch']} "
                  f"(val Dice {r['best_val_dice']:.3f}); {r['seconds']:.0f} s; run: {r['run_dir']}")

    _emit(result, as_json, render)


@app.command()
def evaluate(target: Path = typer.Argument(..., help="Checkpoint file or run directory (its latest model)."),
             data: Path = typer.Option(..., "--data", help="Dataset folder with masks (any, not only the training one)."),
             format: Optional[Format] = typer.Option(None, "--format", help="Override layout detection."),
             positive_only: bool = typer.Option(False, "--positive-only", help="Only images whose mask is not empty."),
             split: str = typer.Option("all", help="all, or train/val/test of the run (needs a run directory)."),
             device: str = typer.Option("auto", help="auto, cpu or cuda."),
             per_image: Optional[Path] = typer.Option(None, help="Also write per-image Dice to this CSV."),
             per_volume: Optional[Path] = typer.Option(None, "--per-volume", help="Grouped data: also write Dice "
                                                       "per volume to this CSV."),
             largest_component: bool = typer.Option(False, "--largest-component", help="Grouped data: keep only each "
                                                    "predicted volume's largest 3D component (26-connected) before "
                                                    "scoring, as Buda et al.; Dice per volume is reported both ways."),
             cache_dir: Optional[Path] = typer.Option(None, help="Decoded-pixel cache (default ~/.cache/alseg)."),
             as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON.")):
    """Dice per image (mean, median), pooled, and per volume (grouped data).

    Grouped data (LGG patients, NIfTI or DICOM volumes): Dice per volume over all its slices, the
    tumour-free ones included (Buda et al.'s convention; a volume with no lesion predicted empty
    scores 1, and volume_dice_mean_nonempty leaves such volumes out, as Buda's code does), Dice on
    lesion slices, and false-positive voxels (and mL) on lesion-free slices.
    Empty-mask convention: an image whose mask and prediction are both empty scores 1.0.
    """
    from alseg.evaluate import evaluate as run_eval, write_per_image_csv

    result = run_eval(target, data, format=format.value if format else None, positive_only=positive_only,
                      split=split, device=device, cache_dir=cache_dir, largest_component=largest_component,
                      reporter=RichReporter(quiet=as_json))
    if per_image:
        write_per_image_csv(per_image, result.ids, result.dice)
    if per_volume:
        if not result.volumes:
            raise AlsegError("--per-volume needs grouped data (volumes or patients)", data)
        write_per_image_csv(per_volume, list(result.volumes), result.volumes.values())
    _emit(result.summary, as_json, lambda r: out.print(_kv_table(f"Dice on {data}", r)))


def _strategy_enum() -> type[Enum]:
    """The registered strategies as a choice (plug-ins registered before the CLI is built appear too)."""
    from alseg.active.strategies import strategy_names

    return Enum("StrategyName", {name: name for name in strategy_names()}, type=str)


StrategyName = _strategy_enum()


def _strategies_help(prefix: str) -> str:
    from alseg.active.strategies import strategy_names, strategy_spec

    return prefix + " " + "; ".join(f"{n}: {strategy_spec(n).help}" for n in strategy_names()) + "."


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _rounds_table(status: dict) -> Table:
    table = Table(title="rounds")
    test = "test per-volume Dice" if status.get("test_metric") == "volume_dice_mean" else "test Dice"
    for col in ("round", "expert-labelled", "pseudo-labelled", "pool", "val Dice", test, "seconds",
                "expert min", "active min"):
        table.add_column(col, justify="right")
    for r in status["rounds"]:
        active = r.get("expert_active_seconds")
        table.add_row(str(r["round"]), str(r["expert_labelled"]), str(r["pseudo_labelled"]), str(r["pool"]),
                      _num(r["val_dice"], ".4f"), _num(r["test_dice"], ".4f"), _num(r["seconds"], ".1f"),
                      _num(r["expert_seconds"] / 60, ".1f"), _num(active / 60 if active else None, ".1f"))
    return table


def _render_model(r: dict) -> None:
    """The latest model's warning (no better than a constant mask) and the open round's pseudo-label gate."""
    if r.get("warning"):
        err.print(f"warning: {r['warning']}", markup=False, highlight=False, soft_wrap=True)
    gate = r.get("gate")
    if gate and gate.get("asked"):
        out.print(f"pseudo-labels, round {r['open_round']}: {gate['reason']}", markup=False, highlight=False,
                  soft_wrap=True)


def _render_status(r: dict) -> None:
    out.print(_rounds_table(r))
    out.print(f"expert-labelled {r['expert_labelled']}, pseudo-labelled {r['pseudo_labelled']}, queued {r['queued']}, "
              f"pool {r['pool']}; expert time {r['expert_seconds'] / 60:.1f} min; stopped: {r['stopped'] or '-'}",
              markup=False, highlight=False)
    totals = (r.get("effort") or {}).get("totals") or {}
    if totals.get("versions"):
        accepted = f", {totals['accepted_as_is']} of {totals['compared_with_prediction']} predictions accepted as is" \
            if totals.get("compared_with_prediction") else ""
        out.print(f"expert effort: {totals['versions']} masks stored for {totals['images']} images, "
                  f"{(totals.get('active_seconds') or 0) / 60:.1f} active min{accepted} "
                  f"(per round and reason: status --json, effort; alseg export --format effort)",
                  markup=False, highlight=False, soft_wrap=True)
    agreement = r.get("agreement") or {}
    if agreement.get("count"):
        out.print(f"annotator agreement: mean Dice {agreement['mean_dice']:.3f} over {agreement['count']} images "
                  "read twice (the first annotator's mask trains)", markup=False, highlight=False, soft_wrap=True)
    _render_model(r)


def _render_run(r: dict) -> None:
    out.print(_rounds_table(r))
    out.print(f"stopped: {r['stopped']}; results in {r['run_dir']}")


@app.command()
def run(preset: Optional[PresetName] = typer.Option(None, help="Settings preset (default: quick-* for the layout; "
                                             "for a plain folder chosen by its images, and printed)."),
        data: Optional[Path] = typer.Option(None, "--data", help="Dataset folder."),
        format: Optional[Format] = typer.Option(None, "--format", help="Override layout detection."),
        config: Optional[Path] = typer.Option(None, "--config", help="YAML file overriding the preset."),
        out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory to create (default runs/run-TIME)."),
        resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this run directory after a crash or Ctrl-C."),
        strategy: Optional[StrategyName] = typer.Option(None, help=_strategies_help("Selection strategy (default ceal).")),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Expert images per round (default 35)."),
        rounds: Optional[int] = typer.Option(None, help="Active-learning rounds after the initial training."),
        budget: Optional[float] = typer.Option(None, help="Stop once this fraction of the train split is expert-labelled."),
        seed: Optional[int] = typer.Option(None, help="Random seed (split, model, selection)."),
        size: Optional[int] = typer.Option(None, help="Working size in pixels."),
        width: Optional[int] = typer.Option(None, help="U-Net base width."),
        epochs: Optional[int] = typer.Option(None, help="Initial training epochs."),
        round_epochs: Optional[int] = typer.Option(None, help="Retraining epochs per round."),
        round_steps: Optional[int] = typer.Option(None, "--round-steps", help="Optimiser steps of every active round, whatever its labelled + pseudo-labelled set (default: the round's epochs): compare strategies at equal training."),
        min_epoch_steps: Optional[int] = typer.Option(None, "--min-epoch-steps", help="At least this many "
                                                         "optimiser steps an epoch, however few the labelled images "
                                                         "(default: the preset's; 0: one pass an epoch)."),
        mc_passes: Optional[int] = typer.Option(None, help="MC-dropout passes T."),
        volume_selection: Optional[str] = VOLUME_SELECTION,
        volume_score: Optional[str] = VOLUME_SCORE,
        max_per_volume: Optional[int] = MAX_PER_VOLUME,
        from_scratch: bool = typer.Option(False, "--from-scratch", help="Retrain from scratch each round (default: warm start)."),
        keep_pseudo: bool = typer.Option(False, "--keep-pseudo", help="Keep pseudo-labels for good (default: transient)."),
        pretrain: Optional[bool] = typer.Option(None, "--pretrain/--no-pretrain", help="Pre-train the U-Net on the "
                                                "train and validation images (no masks) before round 0 (default: "
                                                "the preset's; off in every preset)."),
        split_by: Optional[str] = typer.Option(None, help="group (default) or sample."),
        device: Optional[str] = typer.Option(None, help="auto, cpu or cuda."),
        cache_dir: Optional[Path] = typer.Option(None, help="Decoded-pixel cache (default ~/.cache/alseg)."),
        tensorboard: bool = typer.Option(False, "--tensorboard", help="Also write metrics for TensorBoard to RUN_DIR/tensorboard."),
        as_json: bool = typer.Option(False, "--json", help="Print the rounds as JSON.")):
    """Run the active-learning loop (CEAL by default) with a simulated oracle; resumable.

    The effective config is printed and saved as RUN_DIR/config.yaml.
    """
    from alseg.config import build_config, choose_preset
    from alseg.data import detect_format
    from alseg.active.loop import run_active

    reporter: Reporter = RichReporter(quiet=as_json)

    def with_tensorboard(run_dir: Path, round_epochs: int) -> Reporter:
        if not tensorboard:
            return reporter
        from alseg.report.tensorboard import TensorboardReporter

        return TeeReporter(reporter, TensorboardReporter(run_dir / "tensorboard", round_epochs))

    if resume is not None:
        changing = {"--preset": preset, "--data": data, "--format": format, "--config": config, "--out": out_dir,
                    "--strategy": strategy, "--batch-size": batch_size, "--seed": seed, "--size": size, "--width": width, "--epochs": epochs, "--min-epoch-steps": min_epoch_steps,
                    "--round-epochs": round_epochs, "--mc-passes": mc_passes, "--from-scratch": from_scratch or None,
                    "--keep-pseudo": keep_pseudo or None, "--pretrain/--no-pretrain": pretrain,
                    "--split-by": split_by, "--device": device, "--volume-selection": volume_selection,
                    "--volume-score": volume_score, "--max-per-volume": max_per_volume,
                    "--cache-dir": cache_dir}
        refused = [flag for flag, value in changing.items() if value is not None]
        if refused:
            raise AlsegError(f"--resume continues the run as it was made; {', '.join(refused)} would change it "
                             "(only --rounds, --budget and --tensorboard extend a run)", resume)
        from alseg.project import project_config

        _resume_hint(f"alseg run --resume {resume}")
        result = run_active(resume=resume, rounds=rounds, budget=budget,
                            reporter=with_tensorboard(resume, project_config(resume).active.round_epochs))
    else:
        if data is None and preset == PresetName.demo:
            from alseg.demo import synthetic_data

            data = synthetic_data(reporter)
        if data is None:
            raise AlsegError("--data PATH is required for a new run (or --resume RUN_DIR)")
        fmt = format.value if format else detect_format(data)
        name, sized, why = choose_preset(preset.value if preset else None, data, fmt)
        cfg = build_config(name, config, defaults=sized, overrides={
            "seed": seed,
            "data": {"path": str(data), "format": fmt, "size": size, "split_by": split_by,
                     "cache_dir": str(cache_dir) if cache_dir else None},
            "model": {"width": width},
            "train": {"epochs": epochs, "device": device, "min_epoch_steps": min_epoch_steps},
            "pretrain": {"enabled": pretrain},
            "active": {"strategy": strategy.value if strategy else None, "batch_size": batch_size,
                       "rounds": rounds, "budget": budget,
                       "round_epochs": round_epochs, "round_steps": round_steps, "mc_passes": mc_passes,
                       "warm_start": False if from_scratch else None, "keep_pseudo": True if keep_pseudo else None,
                       "volume_selection": volume_selection, "volume_score": volume_score,
                       "max_per_volume": max_per_volume},
        })
        out = out_dir or _default_out("run")
        _resume_hint(f"alseg run --resume {out}")
        result = run_active(cfg, out, reporter=with_tensorboard(out, cfg.active.round_epochs),
                            notes=() if preset else (f"preset {name}: {why}",))
    _emit(result, as_json, _render_run)


@app.command()
def status(run_dir: Path = typer.Argument(..., help="Run or project directory."),
           as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")):
    """Labels (expert, pseudo, queued, pool) and the finished rounds of a run or project; never writes.

    JSON: top-level expert_labelled, pseudo_labelled, queued, pool, expert_seconds, open_round, stopped;
    model (the latest model's validation Dice beside a constant mask's, useful, warning), warning, gate
    (the open round's pseudo-label gate: asked, limit, reason); rounds (each with val and test Dice,
    seconds, expert seconds and active seconds, the ids the expert labelled, its model and gate);
    effort (per round and selection reason, and totals: images, masks stored, wall and active seconds,
    strokes, clicks, pixels changed from the prediction, accepted as is); agreement (second readings).
    """
    from alseg.active.loop import status as run_status

    _emit(run_status(run_dir), as_json, _render_status)


@app.command()
def demo(data: Optional[Path] = typer.Option(None, "--data", help="Real dataset folder (default: generated lesions)."),
         out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/demo-TIME)."),
         as_json: bool = typer.Option(False, "--json", help="Print the rounds as JSON.")):
    """A complete CEAL run on CPU in about two minutes (generated lesion-like data unless --data)."""
    from alseg.demo import run_demo

    _emit(run_demo(data, out_dir or _default_out("demo"), reporter=RichReporter(quiet=as_json)), as_json, _render_run)


@app.command()
def predict(checkpoint: Path = typer.Argument(..., help="Checkpoint file or run directory (its latest model)."),
            images: Path = typer.Option(..., "--images", help="Folder of images, plain or a dataset layout (masks ignored)."),
            out_dir: Path = typer.Option(..., "--out", help="New or empty folder for masks/, uncertainty/, scores.csv."),
            mc: int = typer.Option(20, "--mc", help="MC-dropout passes T (0: one deterministic pass, no uncertainty)."),
            format: Optional[Format] = typer.Option(None, "--format", help="Override layout detection."),
            device: str = typer.Option("auto", help="auto, cpu or cuda."),
            volume_axis: Optional[str] = typer.Option(None, "--volume-axis", help="Volumes (nifti, dicom): the axis "
                                                      "to slice along: auto (the one with the fewest voxels), "
                                                      "0/1/2, x/y/z or sagittal/coronal/axial."),
            as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.")):
    """Apply a model to new images: a mask at each image's original size, an uncertainty map, scores.

    On volumes (NIfTI, DICOM series) every slice is predicted and each case gets masks/CASE.nii.gz
    and uncertainty/CASE.nii.gz on the input's grid (a NIfTI input's own orientation and affine),
    with volumes.csv giving each case's lesion volume in mL. Unreadable images are listed and
    skipped; the exit status is 2 only when none could be read.
    """
    from alseg.predict import predict_folder

    result = predict_folder(checkpoint, images, out_dir, mc=mc, format=format.value if format else None,
                            volume_axis=volume_axis, device=device, reporter=RichReporter(quiet=as_json))

    def render(r):
        how = f"MC dropout x{r['mc']}" if r["mc"] else "deterministic"
        what = f"{r['images']} slices in {r['volumes']} volumes" if "volumes" in r else f"{r['images']} images"
        out.print(f"predicted {what} ({how}), skipped {len(r['skipped'])}; results in {r['out']}",
                  markup=False, highlight=False, soft_wrap=True)
        for s in r["skipped"]:
            out.print(f"skipped {s['file']}: {s['problem']}", markup=False, highlight=False, soft_wrap=True)

    _emit(result, as_json, render)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="Run directory."),
           images: int = typer.Option(4, help="Test images in the prediction panels."),
           device: str = typer.Option("auto", help="auto, cpu or cuda (for the prediction panels)."),
           out_dir: Optional[Path] = typer.Option(None, "--out", help="Report folder (default RUN_DIR/report; "
                                                  "give one elsewhere for a read-only run)."),
           as_json: bool = typer.Option(False, "--json", help="Print the page's path as JSON.")):
    """Write RUN_DIR/report/index.html (opens offline) with the paper's figures as PNG beside it.

    The run directory itself is only read; the report replaces the previous one when complete.
    """
    from alseg.report import make_report

    page = make_report(run_dir, images=images, device=device, out=out_dir, reporter=RichReporter(quiet=as_json))
    _emit({"html": str(page), "figures": sorted(p.name for p in page.parent.glob("*.png"))}, as_json,
          lambda r: out.print(f"report: {r['html']} ({len(r['figures'])} figures)"))


def _numbers(option: str, text: str | None, kind=int) -> list | None:
    """A comma-separated option (``--seeds``, ``--only-seeds``, ``--fixed-counts``) as numbers of
    ``kind``; None when not given."""
    if text is None:
        return None
    try:
        return [kind(k) for k in text.split(",") if k.strip()]
    except ValueError:
        what = "whole numbers" if kind is int else "numbers"
        raise AlsegError(f"{option} takes {what} separated by commas, not {text!r}") from None


def _first_strategy(summary: dict) -> dict:
    return next(iter(summary["strategies"].values()), {})


def _render_comparison(summary: dict) -> None:
    """The comparison summary as tables: per strategy over seeds, and paired against random."""
    from rich.text import Text

    from alseg.stats import interval_name

    r = summary
    n = r["seeds"]

    def fmt(v, f):
        return "-" if v is None else format(v, f)

    def with_interval(mean, interval, f):
        if mean is None:
            return "-"
        if interval is None or interval[0] is None or n == 1:  # one seed: no interval to show
            return fmt(mean, f)
        return f"{format(mean, f)} [{format(interval[0], f)}, {format(interval[1], f)}]"

    def labels_cell(t, seeds, pct=95):
        missing = t.get(f"labels_to_{pct}pct_full_not_reached")
        if missing is None:
            return "- (no --full)"
        if missing:
            return f"not reached by {len(missing)} of {seeds} seeds"
        return with_interval(t[f"labels_to_{pct}pct_full"], t[f"labels_to_{pct}pct_full_interval"], ".1f")

    def diff_cell(d, f):
        if d is None:
            return "-"
        if d["mean"] is None:
            return f"- ({d['missing']} of {d['n']} seeds without a value)" if d["missing"] else "-"
        text = with_interval(d["mean"], [d["lo"], d["hi"]], f)
        return text + ("" if d.get("p_value") is None else f" p={d['p_value']:.3g}")

    full_text = "-" if r["full_dice"] is None else with_interval(
        r["full_dice"], [r["full"]["test_dice"]["lo"], r["full"]["test_dice"]["hi"]], ".4f")
    if r["full_dice"] is not None and r["settings"].get("train.full_epochs"):
        full_text += f" ({r['settings']['train.full_epochs']} epochs)"
    still = (r.get("full") or {}).get("still_improving_seeds")
    if still:  # the reference kept its last epoch: more epochs might score higher
        full_text += f", still improving on seed(s) {', '.join(map(str, still))}"
    how = f"mean [{interval_name(n)}]" if n > 1 else "one seed, no intervals"
    metric = r.get("metric_label", "Dice")
    table = Table(title=Text(f"{r['preset']}: {n} seed(s), {how}; test {metric}; full supervision {full_text}"))
    cols = ["strategy", "final labels (+ validation)", f"final {metric}", f"AULC (mean {metric})",
            "labels to 95% of full", "labels to 98% of full",
            *(f"Dice at {c['labels']:.0f} labels" for c in _first_strategy(r).get("dice_at_labels") or [])]
    if r["external"]:
        cols.append("external Dice")
    for col in cols:
        table.add_column(col, justify="right")
    for name, t in r["strategies"].items():
        with_val = t.get("final_labels_with_validation")
        row = [name, fmt(t["final_expert_labels"], ".0f") + ("" if with_val is None else f" ({with_val:.0f})"),
               with_interval(t["final_dice"], t["final_dice_interval"], ".4f"),
               with_interval(t["aulc"], t["aulc_interval"], ".4f"), labels_cell(t, t["curve"]["n"]),
               labels_cell(t, t["curve"]["n"], 98),
               *(with_interval(c["mean"], [c["lo"], c["hi"]], ".4f") for c in t.get("dice_at_labels") or [])]
        if r["external"]:
            row.append(with_interval(t["external_dice"], t["external_dice_interval"], ".4f"))
        table.add_row(*(Text(c) for c in row))
    out.print(table)
    for baseline in r["baselines"]:
        key = f"vs_{baseline}"
        diff = Table(title=Text(f"paired per-seed differences vs {baseline} (strategy - {baseline}): mean "
                                f"[{interval_name(n)}] and the sign-flip p-value"))
        for col in ("strategy", "seeds", "AULC diff", "final Dice diff", "labels-to-95% diff"):
            diff.add_column(col, justify="right")
        for name, t in r["strategies"].items():
            if key in t:
                d = t[key]
                diff.add_row(*(Text(c) for c in (name, str(len(d["seeds"])), diff_cell(d["aulc"], "+.4f"),
                                                  diff_cell(d["final_dice"], "+.4f"),
                                                  diff_cell(d["labels_to_95pct_full"], "+.1f"))))
        out.print(diff)
    if r["baseline"] is None:
        out.print("no paired differences: neither random nor fg-random is among the strategies")
    if n == 1:
        out.print("one seed: each interval is the value itself, and nothing can be said about differences")
    elif n <= 3:
        out.print(f"{n} seeds: each interval is the range of the per-seed values, so it is optimistic")
    out.print(Text(f"figure: {r['figure']}"))


@app.command()
def compare(preset: PresetName = typer.Option(..., help="Settings preset shared by every run."),
            data: Path = typer.Option(..., "--data", help="Dataset folder."),
            strategies: str = typer.Option("ceal,random,uncertainty,bald", help=_strategies_help(
                "Comma-separated strategies, of:")),
            seeds: str = typer.Option("3", help="N for seeds 0..N-1 of each strategy (error bands), or a "
                                      "comma-separated list of seeds (e.g. 0,2: the seeds of a split study that "
                                      "have finished; one seed alone: 2, with its comma)."),
            full: bool = typer.Option(False, "--full", help="Also train the full-supervision reference per seed."),
            out_dir: Path = typer.Option(..., "--out", help="Comparison folder (reused and resumed if it exists)."),
            external: Optional[Path] = typer.Option(None, "--external", help="A second labelled dataset (any layout "
                                                    "alseg reads): every run's final model is also scored on it."),
            config: Optional[Path] = typer.Option(None, "--config", help="YAML file overriding the preset."),
            rounds: Optional[int] = typer.Option(None, help="Active-learning rounds."),
            budget: Optional[float] = typer.Option(None, help="Stop once this fraction is expert-labelled."),
            size: Optional[int] = typer.Option(None, help="Working size in pixels."),
            width: Optional[int] = typer.Option(None, help="U-Net base width."),
            epochs: Optional[int] = typer.Option(None, help="Initial epochs."),
            full_epochs: Optional[int] = typer.Option(None, help="The full-supervision reference's epochs "
                                                      "(default: the preset's, else --epochs)."),
            round_epochs: Optional[int] = typer.Option(None, help="Retraining epochs per round."),
            round_steps: Optional[int] = typer.Option(None, "--round-steps", help="Optimiser steps of every active round, whatever its labelled + pseudo-labelled set (default: the round's epochs): compare strategies at equal training."),
            mc_passes: Optional[int] = typer.Option(None, help="MC-dropout passes T."),
            device: Optional[str] = typer.Option(None, help="auto, cpu or cuda."),
            only_seeds: Optional[str] = typer.Option(None, "--only-seeds", help="Comma-separated seeds (of 0..N-1) "
                                                     "to run, and no summary: split a study over processes or "
                                                     "machines sharing --out, then summarise with a call without it."),
            jobs: int = typer.Option(1, "--jobs", help="Worker processes making the runs at once, each with "
                                     "cores/N threads (on CPU, one per core is faster: docs/benchmarks.md); a seed's "
                                     "round 0 is still trained once."),
            fixed_counts: Optional[str] = typer.Option(None, "--fixed-counts", help="Comma-separated expert-label "
                                                       "counts to read each curve's Dice at (default: round 1's and "
                                                       "the last-but-one round's mean counts)."),
            reuse_from: Optional[Path] = typer.Option(None, "--reuse-from", help="Another study's --out (other "
                                                      "active-learning settings, e.g. --round-steps): each seed's round 0 "
                                                      "is adopted from it and its full-supervision references copied, "
                                                      "where they cannot differ."),
            as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON.")):
    """Learning curves of several strategies over seeds, with full supervision and the paper's Dice.

    Per strategy: final test Dice, AULC, Dice at fixed label counts, expert labels to reach 95 % and 98 % of full supervision (with --full), labels counted with the validation masks, and the expert's effort (megapixels changed) where the runs recorded it.

    Each is a mean over seeds with an interval (the seeds' range at 2-3 seeds, a 95 % bootstrap interval above); differences against random are paired by seed, each with its sign-flip p-value (exact up to 16 seeds).

    Writes OUT/compare.png, OUT/compare.csv and OUT/compare.json; runs live in OUT/runs/.
    """
    from alseg.compare import compare as run_compare
    from alseg.config import build_config

    cfg = build_config(preset.value, config, {
        "data": {"path": str(data), "size": size}, "model": {"width": width},
        "train": {"epochs": epochs, "full_epochs": full_epochs, "device": device},
        "active": {"rounds": rounds, "budget": budget, "round_epochs": round_epochs, "round_steps": round_steps,
                   "mc_passes": mc_passes}})

    _resume_hint("the same alseg compare command (finished runs are reused, unfinished ones resumed)")
    chosen = None if only_seeds is None else _numbers("--only-seeds", only_seeds, int)
    numbers = _numbers("--seeds", seeds, int)
    seed_spec = numbers if "," in seeds else (numbers[0] if numbers else 0)  # a count, or the seeds listed
    summary = run_compare(cfg, out_dir, strategies=[s.strip() for s in strategies.split(",") if s.strip()],
                          seeds=seed_spec, full=full, external=external, only_seeds=chosen,
                          jobs=jobs, fixed_counts=_numbers("--fixed-counts", fixed_counts, float),
                          reuse_from=reuse_from, reporter=RichReporter(quiet=as_json))
    if chosen is not None:
        _emit(summary, as_json, lambda r: out.print(f"seeds {', '.join(map(str, r['seeds']))}: "
                                                    f"{len(r['runs'])} runs finished ({', '.join(r['runs'])}); "
                                                    "summarise with the same command without --only-seeds"))
        return

    _emit(summary, as_json, _render_comparison)


@app.command()
def merge(studies: list[Path] = typer.Argument(..., metavar="STUDY...", help="compare.json files (or comparison folders holding one)."),
          out_dir: Path = typer.Option(..., "--out", help="Folder for the merged compare.json, .csv and .png."),
          fixed_counts: Optional[str] = typer.Option(None, "--fixed-counts", help="As in alseg compare."),
          as_json: bool = typer.Option(False, "--json", help="Print the merged summary as JSON.")):
    """One comparison from studies made apart with the same settings, each with some seeds.

    For machines or sessions that could not share a --out folder: the same summary `alseg compare` would give over all their runs, paired by seed. Nothing is trained; every run's curve is read from the files.

    Refused with one line: settings that differ between the studies, a run in two studies with other results, a file from an alseg that did not record the runs' curves (summarise its folder again with alseg compare).
    """
    from alseg.compare import merge as merge_studies

    merged = merge_studies(studies, out_dir, fixed_counts=_numbers("--fixed-counts", fixed_counts, float))
    _emit(merged, as_json, _render_comparison)


# --- a lab's project: init -> query -> label (files or the page) -> ingest -> query ... ---------------

@app.command()
def init(project: Path = typer.Argument(..., help="Project folder to create (new or empty)."),
         images: Path = typer.Option(..., "--images", help="Your images: a plain folder, or a layout alseg reads "
                                     "(isic2017, lgg, folder, nifti, dicom)."),
         masks: Optional[Path] = typer.Option(None, "--masks", help="Masks you already have, paired with a plain "
                                              "images folder by file name (a.png, a_mask.png, a_segmentation.png)."),
         preset: Optional[PresetName] = typer.Option(None, help="Settings preset (default: quick-* for the layout; "
                                             "for a plain folder chosen by its images, and printed)."),
         format: Optional[Format] = typer.Option(None, "--format", help="Override layout detection."),
         config: Optional[Path] = typer.Option(None, "--config", help="YAML file overriding the preset."),
         size: Optional[int] = typer.Option(None, help="Working size in pixels."),
         width: Optional[int] = typer.Option(None, help="U-Net base width."),
         epochs: Optional[int] = typer.Option(None, help="Initial training epochs."),
         round_epochs: Optional[int] = typer.Option(None, help="Retraining epochs per round."),
         min_epoch_steps: Optional[int] = typer.Option(None, "--min-epoch-steps", help="At least this many "
                                                          "optimiser steps an epoch, however few the labelled images "
                                                          "(default: the preset's; 0: one pass an epoch)."),
         mc_passes: Optional[int] = typer.Option(None, help="MC-dropout passes T."),
         seed: Optional[int] = typer.Option(None, help="Random seed."),
         pool: str = typer.Option("unmasked", help="unmasked: images without a mask are the pool; split: split like "
                                  "`alseg run` and hide the pool's masks (a rehearsal on a labelled dataset)."),
         cache_dir: Optional[Path] = typer.Option(None, help="Decoded-pixel cache (default ~/.cache/alseg)."),
         volume_selection: Optional[str] = VOLUME_SELECTION,
         volume_score: Optional[str] = VOLUME_SCORE,
         max_per_volume: Optional[int] = MAX_PER_VOLUME,
         volume_axis: Optional[str] = typer.Option(None, "--volume-axis", help="Volumes (nifti, dicom): slice along "
                                                   "this axis (x, y, z; sagittal, coronal, axial); default: a DICOM "
                                                   "series' acquisition plane, a NIfTI volume's thinnest axis."),
         pretrain: bool = typer.Option(True, "--pretrain/--no-pretrain", help="Pre-train the U-Net on all your "
                                       "images (no masks needed) before the first model, once, cached in the "
                                       "project."),
         as_json: bool = typer.Option(False, "--json", help="Print the project's status as JSON.")):
    """Create a project over your images, with the masks you already have (zero is fine).

    Images with a mask start labelled (a fifth of them validate each round's model); the others are
    the pool the expert is asked about. Without --preset the images choose one: grey images take
    quick-lgg's settings (128 px), colour ones quick-isic's (96 px), smaller images their own size;
    it is printed with the reason. Next: `alseg query PROJECT`.
    """
    from alseg.project import init_project

    result = init_project(project, images, masks, preset=preset.value if preset else None,
                          format=format.value if format else None, config_file=config, pool=pool, pretrain=pretrain,
                          overrides={"seed": seed, "data": {"size": size, "cache_dir": str(cache_dir) if cache_dir else None,
                                                            "volume_axis": volume_axis},
                                     "model": {"width": width}, "train": {"epochs": epochs, "min_epoch_steps": min_epoch_steps},
                                     "active": {"round_epochs": round_epochs, "mc_passes": mc_passes,
                                                "volume_selection": volume_selection, "volume_score": volume_score,
                                                "max_per_volume": max_per_volume}},
                          reporter=RichReporter(quiet=as_json))
    _emit(result, as_json, lambda r: out.print(
        f"project {project}: {r['expert_labelled']} labelled, {r['pool']} in the pool; preset {r['preset']} at "
        f"{r['working_size']} px ({r['preset_reason']}). Next: alseg query {project}",
        markup=False, highlight=False, soft_wrap=True))


@app.command()
def query(project: Path = typer.Argument(..., help="Project folder."),
          n: Optional[int] = typer.Option(None, "-n", help="Images per batch from now on (default 35)."),
          strategy: Optional[StrategyName] = typer.Option(None, help=_strategies_help(
              "Selection strategy from now on (default ceal).")),
          as_json: bool = typer.Option(False, "--json", help="Print the batch and status as JSON.")):
    """Train as needed, score the pool, choose the next batch and export it to PROJECT/rounds/RRR/.

    Each image comes with the model's predicted mask (a head start) and an uncertainty overlay;
    manifest.csv says why each was chosen. Asking again before the batch is labelled shows the
    same batch. Label it in `alseg serve PROJECT`, or put masks in rounds/RRR/masks/ and run
    `alseg ingest PROJECT`.
    """
    from alseg.project import query as run_query

    _resume_hint(f"alseg query {project}")
    result = run_query(project, n, strategy.value if strategy else None, reporter=RichReporter(quiet=as_json))

    def render(r):
        out.print(_rounds_table(r))
        _render_model(r)
        b = r.get("batch")
        if b:
            out.print(f"round {b['round']}: {b['images']} images to label, {b['queued']} still queued, in {b['folder']}\n"
                      f"label them with `alseg serve {project}` or put masks in {b['masks']} and run "
                      f"`alseg ingest {project}`", markup=False, highlight=False, soft_wrap=True)
        else:
            out.print(f"stopped: {r['stopped']}", markup=False, highlight=False)

    _emit(result, as_json, render)


@app.command()
def ingest(project: Path = typer.Argument(..., help="Project folder."),
           folder: Optional[Path] = typer.Argument(None, help="Folder of masks (default PROJECT/rounds/RRR/masks), "
                                                   "a case's mask volume CASE.nii.gz (a volume project), "
                                                   "or another tool's export: a CVAT 'Segmentation mask 1.1' zip, a "
                                                   "Label Studio JSON, a COCO JSON, an `alseg export` folder."),
           round: Optional[int] = typer.Option(None, "--round", help="Match the masks to this round's batch (to "
                                               "correct a past round; by default the open batch's names come "
                                               "first, then any labelled image's)."),
           allow_empty: bool = typer.Option(False, "--allow-empty", help="Accept empty masks (images without a lesion)."),
           as_json: bool = typer.Option(False, "--json", help="Print what was stored and refused as JSON.")):
    """Validate the expert's masks and store the valid ones: the open batch's, or corrections of any round.

    A mask is named after its image (see manifest.csv; a _mask suffix is fine), binary (0/255 or 0/1),
    at the image's original size or the working size, and not empty unless --allow-empty. Every
    refused file is listed with its problem and its image stays as it was; exit status 2 when any was
    refused. The same mask twice changes nothing; a different mask for a labelled image replaces it,
    the earlier version is kept (`alseg undo PROJECT ID` restores it) and the next training uses the
    new one. Masks from CVAT, Label Studio or COCO pass the same checks.

    Volumes (NIfTI, DICOM): save a case's corrected mask volume (rounds/RRR/volumes/CASE_predicted.nii.gz
    edited in your viewer) on the image's grid as CASE.nii.gz or CASE_mask.nii.gz in rounds/RRR/masks/, or
    give the file; the batch's slices of that case (CASE_slices.txt) are taken from it, its other slices
    ignored (a batch slice without lesion needs --allow-empty). A volume of another shape or affine than
    the image, or not binary, is refused.
    """
    from alseg.project import ingest as run_ingest

    result = run_ingest(project, folder, allow_empty=allow_empty, round=round)

    def render(r):
        out.print(f"round {r['round']}: stored {len(r['stored'])}, replaced {len(r['replaced'])}, unchanged "
                  f"{len(r['unchanged'])}, refused {len(r['invalid'])}; {r['labelled']} of {r['total']} labelled",
                  markup=False, highlight=False)
        for vol in r.get("volumes", []):
            out.print(f"{vol['file']}: case {vol['case']}, took {vol['taken']} of round {vol['round']}'s "
                      f"{vol['slices']} slice(s), ignored its other {vol['ignored']}",
                      markup=False, highlight=False, soft_wrap=True)
        if r["replaced"]:
            out.print(f"replaced masks keep their earlier version: `alseg undo {project} ID` restores one",
                      markup=False, highlight=False, soft_wrap=True)
        for bad in r["invalid"]:
            err.print(f"alseg: refused: {bad['file']}: {bad['problem']}", markup=False, highlight=False, soft_wrap=True)
        if r["complete"]:
            out.print(f"the batch is complete: `alseg query {project}` trains and chooses the next one "
                      f"(or the review page's Next batch)", markup=False, highlight=False, soft_wrap=True)

    _emit(result, as_json, render)
    if result["invalid"]:
        raise typer.Exit(2)


@app.command()
def undo(project: Path = typer.Argument(..., help="Project folder."),
         id: str = typer.Argument(..., help="The image's id (as in manifest.csv)."),
         annotator: str = typer.Option("local", help="Whose latest mask to withdraw."),
         as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON.")):
    """Withdraw the latest mask stored for an image: its previous version is current again.

    When it was the image's only mask and its round is not trained yet, the image goes back to the
    batch's queue. Every version stays in the history (status --json, the report).
    """
    from alseg.project import undo as run_undo

    _emit(run_undo(project, id, annotator=annotator), as_json, lambda r: out.print(
        f"{id}: {r.get('outcome', 'undone')}" + (f" (version {r['version']} is current)" if r.get("version") else ""),
        markup=False, highlight=False, soft_wrap=True))


class ExportFormat(str, Enum):
    png = "png"
    coco = "coco"
    cvat = "cvat"
    labelstudio = "labelstudio"
    effort = "effort"


@app.command()
def export(project: Path = typer.Argument(..., help="Project folder."),
           format: ExportFormat = typer.Option(..., "--format", help="png: images and 0/255 masks with a manifest; "
                                               "coco: COCO instances JSON (RLE); cvat: a 'Segmentation mask 1.1' zip "
                                               "CVAT imports; labelstudio: tasks JSON with brush masks; effort: the "
                                               "expert's effort, one CSV row per annotation."),
           out_path: Path = typer.Option(..., "--out", help="New or empty folder (an earlier export of the same "
                                         "format is replaced); for effort, the CSV file."),
           predictions: bool = typer.Option(True, "--predictions/--no-predictions", help="Add the open batch's "
                                            "predicted masks as pre-annotations where the format has them."),
           as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON.")):
    """Every expert mask of a project, all rounds, out to the tools labs use (reads only).

    The images go with their masks at their original size, one file name per id; masks come back
    with `alseg ingest PROJECT FILE`. Each format's folder holds a README.txt saying how to load it.
    """
    if format is ExportFormat.effort:
        from alseg.project import export_effort

        _emit(export_effort(project, out_path), as_json, lambda r: out.print(
            f"{r['rows']} annotation events written to {r['path']}", markup=False, highlight=False, soft_wrap=True))
        return
    from alseg.annotate.exchange import export_project

    result = export_project(project, format.value, out_path, predictions=predictions,
                            reporter=RichReporter(quiet=as_json))

    def render(r):
        out.print(f"{r['masks']} masks and {r['images']} images written to {r['out']} as {r['format']}"
                  + (f", with {r['predictions']} predicted masks" if r.get("predictions") else ""),
                  markup=False, highlight=False, soft_wrap=True)
        for note in r.get("notes") or ():
            out.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)

    _emit(result, as_json, render)


class NextMode(str, Enum):
    button = "button"
    auto = "auto"


@app.command()
def serve(project: Path = typer.Argument(..., help="Project folder."),
          port: int = typer.Option(8765, help="Port (0: a free one, printed)."),
          host: str = typer.Option("127.0.0.1", help="Address to bind. 127.0.0.1: this machine only. Any other "
                                   "(0.0.0.0: every interface) lets other machines reach the page, and then every "
                                   "request needs a token (see below)."),
          open_browser: bool = typer.Option(False, "--open", help="Open the page in a browser."),
          next_mode: NextMode = typer.Option(NextMode.button, "--next", help="button: the page's Next batch button "
                                             "trains and exports the next batch; auto: finishing a batch starts it."),
          annotator: str = typer.Option("local", help="Who submits from this machine (recorded with every mask; "
                                        "with tokens, each token names its annotator)."),
          token_file: Optional[Path] = typer.Option(None, "--token-file", help="Tokens kept by the lab: lines "
                                                    "`NAME TOKEN` (or one bare token for --annotator).")):
    """The review page: the expert's workplace for a project, in a browser.

    Correct the predicted masks of the open batch, reopen and correct any earlier round, undo a
    submit, and start the next batch (training runs in a worker; the page stays usable). Each mask is
    validated and stored at once with who submitted it and the active seconds spent. Holds the
    project's writer lock while it runs.

    Off this machine: with --host other than 127.0.0.1 the page is reachable from the network and
    every request needs a token: the project's (`alseg token PROJECT NAME`, one per annotator), a
    --token-file, or one made now for --annotator and printed in the address to open
    (http://HOST:PORT/?token=...). Tokens travel in clear over plain HTTP: on a network you do not
    trust, keep 127.0.0.1 and put an HTTPS reverse proxy in front (README, "Remote experts").
    """
    import signal

    from alseg.annotate.server import serve as run_server

    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C is how the page is stopped: no resume hint
    run_server(project, host=host, port=port, open_browser=open_browser, token_file=token_file, annotator=annotator,
               next_mode=next_mode.value, log=lambda text: err.print(text, markup=False, highlight=False, soft_wrap=True))


@app.command()
def token(project: Path = typer.Argument(..., help="Project folder."),
          name: str = typer.Argument(..., help="The annotator's name (recorded with every mask they submit)."),
          as_json: bool = typer.Option(False, "--json", help="Print the name and token as JSON.")):
    """Make a token for an annotator of the review page (replacing that name's earlier token).

    The token is printed once; the project keeps only its hash (PROJECT/annotators.json). With
    tokens made, `alseg serve` asks every request for one, on any address; off this machine
    (--host other than 127.0.0.1) it always does. Give each expert the page's address with their
    token: http://HOST:PORT/?token=TOKEN. Run it while `alseg serve` is stopped.
    """
    from alseg.annotate.auth import Annotators
    from alseg.rundir import RunDir

    run_dir = RunDir(project).require()
    with run_dir.lock("token"):
        secret = Annotators.load(run_dir.root).add(name)
    _emit({"annotator": name, "token": secret}, as_json, lambda r: out.print(
        f"token for {name}: {secret}\nopen the page at http://HOST:PORT/?token={secret} (only its hash is kept)",
        markup=False, highlight=False, soft_wrap=True))


_RESUME_HINT: list[str] = []


def _resume_hint(command: str) -> None:
    """What to run after Ctrl-C or a full disk (the command in progress sets it)."""
    _RESUME_HINT[:] = [command]


class _Interrupted(BaseException):
    """Ctrl-C, raised instead of KeyboardInterrupt: typer turns KeyboardInterrupt into a bare exit
    130 (newer releases) or "Aborted!" exit 1 (older ones) before ``main`` could say how to resume."""


def _raise_interrupted(signum, frame):
    raise _Interrupted()


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    _RESUME_HINT.clear()
    previous = None
    # Only where Ctrl-C would interrupt anyway (a background job started by a shell ignores SIGINT).
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous = signal.signal(signal.SIGINT, _raise_interrupted)
    try:
        app(args=argv, prog_name="alseg", standalone_mode=True)
    except AlsegError as exc:
        err.print(f"alseg: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except (_Interrupted, KeyboardInterrupt):
        hint = f"; resume with {_RESUME_HINT[0]}" if _RESUME_HINT else ""
        err.print(f"alseg: interrupted{hint}", markup=False, highlight=False, soft_wrap=True)
        return 130
    except (OSError, sqlite3.OperationalError) as exc:
        import errno

        # ENOSPC, a quota (EDQUOT) and SQLite's SQLITE_FULL are all "disk full" to the user
        if not ((isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT))
                or (isinstance(exc, sqlite3.OperationalError) and "disk is full" in str(exc))):
            raise
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        hint = f"; free space and resume with {_RESUME_HINT[0]}" if _RESUME_HINT else ""
        err.print(f"alseg: error: {where}disk full; every finished step is saved and consistent{hint}",
                  markup=False, highlight=False, soft_wrap=True)
        return 2
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return 0


def entry() -> None:
    """The ``alseg`` command. Under torchrun (``WORLD_SIZE`` > 1) rank 0 runs the command and the
    other ranks serve its collective steps (:mod:`alseg.distributed`)."""
    from alseg import distributed

    if distributed.init_from_env() > 0:
        import alseg.active.uncertainty  # noqa: F401  (registers the "mc" step)
        import alseg.train  # noqa: F401  (registers the "fit" step)

        try:
            distributed.serve()
        except BaseException:  # rank 0 is gone or the group broke: nothing to leave together
            traceback.print_exc()
            distributed.abandon(1)
        distributed.shutdown()
        distributed.exit_process(0)
    code = 1
    try:
        with distributed.leading():
            code = main()
    except BaseException:
        if distributed.rank_and_world()[1] == 1:
            raise
        traceback.print_exc()
    finally:
        distributed.shutdown()
    distributed.exit_process(code)
