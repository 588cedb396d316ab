"""The report's figures, drawn with matplotlib from plain data (what the store recorded).

Every function takes arrays or records and a path, writes one PNG and returns the path. Figures
carry titles that say what they show and on which split, axis labels with units, legends and
colour bars, at a size that stays legible in the HTML page (about 1000 px wide). Each PNG also
carries what it draws as text (:func:`describe`: titles, axis labels, legend entries, points per
line) in its ``Title`` and ``Description`` chunks, for screen readers and for checks that a figure
shows what its caption says.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # no display: reports are written headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 110
COLOURS = {"full": "#000000", "paper": "#ff7f0e"}  # strategies' colours: their registry entries


def strategy_colour(name: str) -> str | None:
    from alseg.active.strategies import strategy_names, strategy_spec

    return strategy_spec(name).colour if name in strategy_names() else COLOURS.get(name)
def kind_styles() -> dict[str, tuple[str, str]]:
    """``{kind: (colour, legend label)}`` for each reason a chosen image can be shown under, read
    from the strategy registry (``REASONS``), so a plug-in strategy's reasons get their own."""
    from alseg.active.strategies import REASONS

    return {kind: (spec.colour, spec.label if kind == "pseudo" else f"expert: {spec.label}")
            for kind, spec in REASONS.items() if kind != "initial"}


def describe(fig) -> dict:
    """What ``fig`` draws, as text: its title, and per axes its title, axis labels, legend entries
    and, per labelled line, its number of finite points and its line style (``-``, ``--``, ``None``)."""
    axes = []
    for ax in fig.axes:
        legend = ax.get_legend()
        lines = {line.get_label(): {"points": int(np.isfinite(np.asarray(line.get_ydata(), float)).sum()),
                                    "linestyle": line.get_linestyle()}
                 for line in ax.get_lines() if not line.get_label().startswith("_")}
        entry = {"title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
                 "legend": [t.get_text() for t in legend.get_texts()] if legend else [], "lines": lines}
        if any(entry.values()):
            axes.append(entry)
    title = fig.get_suptitle() or next((a["title"] for a in axes if a["title"]), "")
    return {"title": title, "axes": axes}


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    about = describe(fig)
    fig.savefig(path, dpi=DPI, bbox_inches="tight",
                metadata={"Title": about["title"], "Description": json.dumps(about), "Software": "alseg"})
    plt.close(fig)
    return path


def _display(image: np.ndarray) -> np.ndarray:
    return image[..., 0] if image.shape[-1] == 1 else image


def predictions(path, title: str, ids: Sequence[str], images: np.ndarray, truths: np.ndarray, means: np.ndarray,
                variances: np.ndarray, dices: Sequence[float]) -> Path:
    """Rows of image | ground truth | MC-mean prediction | uncertainty map (with colour bars)."""
    n = len(ids)
    fig, axes = plt.subplots(n, 4, figsize=(11, 2.6 * n + 0.4), squeeze=False, layout="constrained")
    vmax = max(float(np.max(variances)), 1e-6)
    for row in range(n):
        ax = axes[row]
        ax[0].imshow(_display(images[row]), cmap="gray")
        ax[0].set_ylabel(ids[row], fontsize=8)
        ax[1].imshow(truths[row], cmap="gray", vmin=0, vmax=1)
        im2 = ax[2].imshow(means[row], cmap="viridis", vmin=0, vmax=1)
        ax[2].contour(means[row] > 0.5, levels=[0.5], colors="white", linewidths=0.8)
        im3 = ax[3].imshow(variances[row], cmap="magma", vmin=0, vmax=vmax)
        fig.colorbar(im2, ax=ax[2], shrink=0.9, label="P(lesion)")
        fig.colorbar(im3, ax=ax[3], shrink=0.9, label="variance")
        ax[2].set_xlabel(f"Dice {dices[row]:.3f}", fontsize=9)
        for a in ax:
            a.set_xticks([])
            a.set_yticks([])
    for a, t in zip(axes[0], ("image", "ground truth", "MC-mean prediction", "uncertainty (MC variance)")):
        a.set_title(t, fontsize=10)
    fig.suptitle(title, fontsize=12)
    return _save(fig, path)


def uncertainty_vs_dice(path, round: int, scores: np.ndarray, dice: np.ndarray, kinds: Sequence[str | None]) -> Path:
    """Scatter of each pool image's uncertainty score against the Dice of its MC-mean mask."""
    fig, ax = plt.subplots(figsize=(8, 5))
    kinds_arr = np.array([k or "" for k in kinds])
    ax.scatter(scores[kinds_arr == ""], dice[kinds_arr == ""], s=10, c="#bbbbbb", label="pool (not chosen)")
    for kind, (colour, label) in kind_styles().items():
        sel = kinds_arr == kind
        if sel.any():
            ax.scatter(scores[sel], dice[sel], s=22, c=colour, label=label, edgecolors="black", linewidths=0.3)
    ax.set_xlabel("uncertainty score (per-pixel MC variance summed over the image)")
    ax.set_ylabel("Dice of the MC-mean mask vs ground truth")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Round {round}: uncertainty vs Dice on the pool ({len(scores)} unlabelled training images, "
                 f"model of round {round - 1})")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def score_histogram(path, round: int, scores: np.ndarray, kinds: Sequence[str | None], *, bins: int,
                    regions: dict[str, tuple[float, float]]) -> Path:
    """Histogram of the pool's scores with the CEAL regions shaded and the chosen images marked."""
    fig, ax = plt.subplots(figsize=(9, 5))
    counts, edges, _ = ax.hist(scores, bins=bins, color="#9ecae1", edgecolor="#4a90c2", linewidth=0.4,
                               label="pool images")
    shade = {"missed": "#9467bd", "low": "#2ca02c", "uncertain": "#d62728", "pseudo": "#ff7f0e"}
    names = {"missed": "missed region", "low": "low-uncertainty region", "uncertain": "most-uncertain bins",
             "pseudo": "pseudo-label (modal) bin"}
    for name, (lo, hi) in regions.items():
        if hi > lo:
            ax.axvspan(lo, hi, color=shade[name], alpha=0.15, label=names[name])
    kinds_arr = np.array([k or "" for k in kinds])
    top = max(float(counts.max()), 1.0)
    for kind, (colour, label) in kind_styles().items():
        sel = kinds_arr == kind
        if sel.any():
            ax.plot(scores[sel], np.full(sel.sum(), -0.04 * top), "|", color=colour, markersize=12, mew=1.5,
                    label=f"{label} ({sel.sum()})")
    ax.set_ylim(-0.08 * top, top * 1.08)
    ax.set_xlabel("uncertainty score (sum of per-pixel MC variance)")
    ax.set_ylabel("images per bin")
    ax.set_title(f"Round {round}: uncertainty scores of the pool ({len(scores)} unlabelled training images, "
                 f"{bins} bins) and who was chosen")
    ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def training_curves(path, title: str, epochs: Sequence[dict], round_epochs: bool = False,
                    val_images: int | None = None) -> Path:
    """Train and validation Dice per epoch; for the active phase, epochs run on across rounds.
    ``val_images``: how many validation images, named in the legend."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = np.arange(1, len(epochs) + 1)
    ax.plot(x, [e["train_dice"] for e in epochs], "-o", ms=3, label="train Dice (augmented batches)")
    val_label = "validation Dice" + (f" ({val_images} images)" if val_images else "")
    ax.plot(x, [np.nan if e["val_dice"] is None else e["val_dice"] for e in epochs], "-s", ms=3, label=val_label)
    if round_epochs:
        starts = [i for i in range(1, len(epochs)) if epochs[i]["round"] != epochs[i - 1]["round"]]
        for i, s in enumerate(starts):
            ax.axvline(s + 0.5, color="gray", lw=0.6, ls=":", label="new round" if i == 0 else None)
    ax.set_xlabel("epoch" + (" (cumulative over rounds)" if round_epochs else ""))
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return _save(fig, path)


def learning_curves(path, title: str, curves: dict[str, dict], *, train_size: int | None = None,
                    full: tuple[float, ...] | None = None, full_epochs: int | None = None,
                    paper: float | None = None, ylabel: str = "test Dice (mean over images)",
                    full_band: str | None = None, effort: dict[str, dict] | None = None) -> Path:
    """Test Dice against expert-labelled images, one line per ``curves[name] = {"x", "mean", "std"}``.

    The band around a curve of several seeds (``"n"`` > 1) is its interval ``"lo"``..``"hi"`` when
    the curve has one, named in the legend by the curve's ``"band"`` (what the interval is for its
    number of seeds: the range of 2-3 seeds, a bootstrap interval over more; "interval" when not
    given), else ±1 ``"std"``. ``full`` is the full-supervision Dice as ``(mean, std)`` or
    ``(mean, lo, hi)``, its band named by ``full_band``; a dotted line marks 95 % of it;
    ``full_epochs``, when given, is named in its legend entry.

    ``effort``, when given (``{name: {"x", "mean", "lo"?, "hi"?, "n", "band"?}}``, x in megapixels),
    adds a second panel below: the same test Dice against the megapixels the expert changed from
    the model's predictions, the cost of the labels rather than their count.
    """
    rows = 2 if effort else 1
    fig, axes = plt.subplots(rows, 1, figsize=(9, 5.5 * rows), squeeze=False,
                             layout="constrained" if effort else None)
    ax = axes[0][0]
    _curves_with_bands(ax, curves)
    if full is not None:
        lo, hi = (full[1], full[2]) if len(full) == 3 else (full[0] - full[1], full[0] + full[1])
        band = lo is not None and hi is not None and hi > lo
        what = (f", band: {full_band or 'interval'}" if len(full) == 3 else ", band: ± std") if band else ""
        trained = f"{full_epochs} epochs, " if full_epochs else ""
        ax.axhline(full[0], color=COLOURS["full"], ls="--", lw=1.2,
                   label=f"full supervision ({trained}{full[0]:.3f}{what})")
        if band:
            ax.axhspan(lo, hi, color="black", alpha=0.07)
        ax.axhline(0.95 * full[0], color=COLOURS["full"], ls=":", lw=0.9, label="95 % of full supervision")
    if paper is not None:
        ax.axhline(paper, color=COLOURS["paper"], ls="-.", lw=1.2, label=f"paper's reported Dice ({paper:.2f})")
    ax.set_xlabel("expert-labelled training images")
    ax.set_ylabel(ylabel)
    if train_size:
        sec = ax.secondary_xaxis("top", functions=(lambda v: 100 * v / train_size, lambda p: p * train_size / 100))
        sec.set_xlabel("% of the training split labelled")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.85)
    if effort:
        cost = axes[1][0]
        _curves_with_bands(cost, effort)
        if full is not None:
            cost.axhline(full[0], color=COLOURS["full"], ls="--", lw=1.2, label=f"full supervision ({full[0]:.3f})")
        cost.set_xlabel("megapixels the expert changed from the model's predicted masks (cumulative, working size)")
        cost.set_ylabel(ylabel)
        cost.set_title("The same test Dice against the expert's effort (pixels changed), not the image count")
        cost.grid(alpha=0.3)
        cost.legend(fontsize=8, loc="best", framealpha=0.85)
    return _save(fig, path)


def _curves_with_bands(ax, curves: dict[str, dict]) -> None:
    """One line per curve (mean over seeds) with its band (interval or ± std) where it has several seeds."""
    for name, c in curves.items():
        x, m = np.asarray(c["x"], float), np.asarray(c["mean"], float)
        colour = strategy_colour(name)
        n = c.get("n", 1)
        has_interval = "lo" in c and "hi" in c
        if n > 1 and has_interval and c.get("band"):
            label = f"{name} (mean, band: {c['band']})"  # the band's name says how many seeds
        elif n > 1:
            label = f"{name} (mean, {'band: interval' if has_interval else '± std'}, {n} seeds)"
        else:
            label = name
        ax.plot(x, m, "-o", ms=4, color=colour, label=label)
        if n > 1:
            s = np.asarray(c.get("std", np.zeros_like(m)), float)
            lo, hi = ((np.asarray(c["lo"], float), np.asarray(c["hi"], float)) if has_interval else (m - s, m + s))
            ax.fill_between(x, lo, hi, color=colour, alpha=0.18, linewidth=0)


def run_learning_curve(path, title: str, labelled: Sequence[int], rounds: Sequence[int], *,
                       test: Sequence[float | None] | None = None, test_images: int | None = None,
                       val: Sequence[float | None] | None = None, val_images: int | None = None,
                       train_size: int | None = None, test_label: str | None = None,
                       ylabel: str = "Dice (mean over images)") -> Path:
    """One run's Dice after each round against its expert-labelled images.

    Test Dice is the solid line when the run has a test split, with validation Dice dashed beside
    it; a project (no test split) shows validation Dice alone, solid. Each point is marked with
    its round; ``*_images`` name how many images each Dice is the mean of. ``test_label``
    replaces the test line's legend entry (``"test Dice (N images)"``) where the test figure is
    another (per-volume Dice), and ``ylabel`` the axis label.
    """
    fig, ax = plt.subplots(figsize=(9, 5.5))
    x = np.asarray(labelled, float)
    has_test = test is not None and any(v is not None for v in test)
    has_val = val is not None and any(v is not None for v in val)
    marked = None
    if has_test:
        marked = _floats(test)
        ax.plot(x, marked, "-o", ms=5, color="#1f77b4", label=test_label or f"test Dice ({test_images} images)")
    if has_val:
        values = _floats(val)
        ax.plot(x, values, "--s" if has_test else "-s", ms=4 if has_test else 5, color="#2ca02c",
                label=f"validation Dice ({val_images} images)")
        marked = values if marked is None else marked
    if marked is not None:
        for r, xi, yi in zip(rounds, x, marked):
            if np.isfinite(yi):
                ax.annotate(f"round {r}", (xi, yi), textcoords="offset points", xytext=(4, 7), fontsize=7,
                            color="#555555")
    else:
        ax.text(0.5, 0.5, "no Dice recorded for any round", transform=ax.transAxes, ha="center", color="#777777")
    ax.set_xlabel("expert-labelled training images")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    if train_size:
        sec = ax.secondary_xaxis("top", functions=(lambda v: 100 * v / train_size, lambda p: p * train_size / 100))
        sec.set_xlabel("% of the training split labelled")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if has_test or has_val:
        ax.legend(fontsize=9, loc="best", framealpha=0.85)
    return _save(fig, path)


def _floats(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], float)


def reason_style(reason: str | None) -> tuple[str, str]:
    """``(legend label, colour)`` of a recorded selection reason (the strategy registry's)."""
    from alseg.active.strategies import REASONS, reason_kind

    if reason is None:
        return "no selection recorded", "#7f7f7f"
    spec = REASONS[reason_kind(reason)]
    return spec.label, spec.colour


def expert_effort(path, title: str, rows: Sequence[dict]) -> Path:
    """The expert's effort per round, stacked by selection reason, in three panels: minutes (wall
    clock, with active minutes marked), images labelled (with mask versions and images accepted as
    predicted marked) and pixels changed from the model's predicted mask.

    ``rows``: one per (round, reason) as :meth:`alseg.store.RunStore.effort_by_round` gives them (renamed as :data:`alseg.report.EFFORT_COLUMNS`);
    a value that was not recorded is None and is left out of its panel.
    """
    rows = [r for r in rows if r["round"] is not None]  # time on an image no round selected has no bar to join
    rounds = sorted({r["round"] for r in rows})
    pos = {r: k for k, r in enumerate(rounds)}
    styles: dict[str, tuple[str, str]] = {}
    for r in rows:
        styles.setdefault(reason_style(r["reason"])[0], reason_style(r["reason"]))

    def stacked(ax, key: str, scale: float = 1.0) -> bool:
        bottom = np.zeros(len(rounds))
        drawn = False
        for label, colour in styles.values():
            heights = np.zeros(len(rounds))
            for r in rows:
                if reason_style(r["reason"])[0] == label and r.get(key) is not None:
                    heights[pos[r["round"]]] += r[key] * scale
            if heights.any():
                ax.bar(np.arange(len(rounds)), heights, bottom=bottom, color=colour, width=0.6, label=label)
                bottom += heights
                drawn = True
        return drawn

    def per_round(key: str, scale: float = 1.0) -> np.ndarray | None:
        if all(r.get(key) is None for r in rows):
            return None
        out = np.zeros(len(rounds))
        for r in rows:
            out[pos[r["round"]]] += (r.get(key) or 0) * scale
        return out

    fig, axes = plt.subplots(3, 1, figsize=(10, 10), sharex=True, layout="constrained")
    minutes, images, pixels = axes
    stacked(minutes, "seconds", 1 / 60)
    active = per_round("active_seconds", 1 / 60)
    if active is not None:
        minutes.plot(np.arange(len(rounds)), active, "D", color="black", ms=6, ls="none",
                     label="active minutes (drawing, all reasons)")
    minutes.set_ylabel("expert minutes")
    minutes.set_title("Expert minutes per round (wall clock on the review page, bars by selection reason)")
    stacked(images, "images")
    versions = per_round("versions")
    if versions is not None:
        images.plot(np.arange(len(rounds)), versions, "o", color="black", mfc="none", ms=7, ls="none",
                    label="mask versions stored (corrections count)")
    accepted = per_round("accepted_as_is")
    if accepted is not None:
        images.plot(np.arange(len(rounds)), accepted, "*", color="#e6ab02", mec="black", ms=10, ls="none",
                    label="accepted as predicted")
    images.set_ylabel("images")
    images.set_title("Images labelled per round")
    if not stacked(pixels, "changed_prediction_sum", 1 / 1000):
        pixels.text(0.5, 0.5, "pixels changed from the prediction: not recorded for these masks",
                    transform=pixels.transAxes, ha="center", va="center", color="#777777")
    pixels.set_ylabel("thousand pixels")
    pixels.set_title("Pixels the expert changed from the model's predicted mask, per round")
    pixels.set_xlabel("round")
    pixels.set_xticks(np.arange(len(rounds)), [str(r) for r in rounds])
    pixels.set_xlim(-0.75, len(rounds) - 0.25)  # one round draws a bar, not a wall
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
        ax.set_ylim(0, max(ax.get_ylim()[1], 1) * 1.08)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), framealpha=0.85)
    fig.suptitle(title, fontsize=12)
    return _save(fig, path)
