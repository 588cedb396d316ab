"""Has the model earned trust? Its validation Dice against constant masks, and the pseudo-label gate.

Pure functions over plain numbers; the loop records what they return and ``status``, ``query``,
the report and the review page show it.

* :func:`model_health`: a round's best validation Dice beside what the two constant masks score
  on the same images (all background: 1 on the empty masks, 0 elsewhere; all foreground:
  ``2|M| / (|M| + N)`` per image). A model no better than the better constant has learnt nothing
  an expert could use: its predicted masks are no head start and its pseudo-labels are noise.
* :func:`pseudo_gate`: how many pseudo-labels a round may take (a departure from CEAL, which
  always takes ``20 x round``): none while the model that would draw them is not useful or its
  validation Dice is below ``min_val_dice``, and never more than ``max_pool_fraction`` of the
  images left in the pool after the expert's batch (CEAL's fallback otherwise takes the whole pool
  once the modal bin runs dry, so a last round trains on the entire training split).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# A model must beat the better constant mask by this much to count as useful (validation Dice).
USEFUL_MARGIN = 0.05


@dataclass(frozen=True)
class ModelHealth:
    val_dice: float | None
    empty_mask_dice: float
    full_mask_dice: float
    val_images: int

    @property
    def constant_dice(self) -> float:
        return max(self.empty_mask_dice, self.full_mask_dice)

    @property
    def useful(self) -> bool:
        return self.val_dice is not None and self.val_dice >= self.constant_dice + USEFUL_MARGIN

    def warning(self) -> str | None:
        """What to tell the user when the model is no better than a constant mask, else None."""
        if self.useful:
            return None
        if self.val_dice is None:
            return "the model has no validation images, so nothing says it has learnt anything"
        which = "all-background" if self.empty_mask_dice >= self.full_mask_dice else "all-foreground"
        return (f"the model is no better than an {which} mask on validation (Dice {self.val_dice:.3f} against "
                f"{self.constant_dice:.3f}): its masks are no head start and it takes no pseudo-labels; label "
                "more images, keep pre-training on (pretrain.enabled), or train more steps (--min-epoch-steps)")

    def to_dict(self) -> dict:
        return {**asdict(self), "constant_dice": self.constant_dice, "useful": self.useful,
                "warning": self.warning()}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelHealth":
        """Back from :meth:`to_dict` (the store's record); the derived fields are derived again."""
        return cls(d["val_dice"], d["empty_mask_dice"], d["full_mask_dice"], d["val_images"])


def constant_mask_dice(masks: np.ndarray) -> tuple[float, float]:
    """Mean per-image Dice of an all-background and an all-foreground prediction on ``masks`` (N, H, W)."""
    m = np.asarray(masks).reshape(len(masks), -1) > 0
    if len(m) == 0:
        return 0.0, 0.0
    fg = m.sum(1)
    empty = float(np.mean(fg == 0))
    full = float(np.mean(np.where(fg == 0, 0.0, 2 * fg / (fg + m.shape[1]))))
    return empty, full


def model_health(val_dice: float | None, val_masks: np.ndarray | None) -> ModelHealth:
    masks = np.zeros((0, 1, 1)) if val_masks is None else np.asarray(val_masks)
    empty, full = constant_mask_dice(masks)
    return ModelHealth(val_dice, empty, full, len(masks))


@dataclass(frozen=True)
class PseudoGate:
    asked: int
    limit: int
    pool_left: int
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def pseudo_gate(asked: int, health: ModelHealth | None, pool_left: int, *, min_val_dice: float,
                max_pool_fraction: float, enabled: bool = True) -> PseudoGate:
    """How many of the ``asked`` pseudo-labels may be taken, with the reason in one line.

    ``pool_left``: pool images not going to the expert this round. ``health``: of the model that
    scores the pool and draws the pseudo-labels (None: nothing recorded, so nothing earned).
    ``enabled`` False drops the Dice gate (CEAL's rule), not the cap.
    """
    if asked <= 0:
        return PseudoGate(asked, 0, pool_left, "no pseudo-labels asked this round")
    if not enabled:
        cap = int(np.floor(max_pool_fraction * pool_left))
        limit = min(asked, cap)
        return PseudoGate(asked, limit, pool_left, f"{limit} of {asked} pseudo-labels: the Dice gate is off"
                                                   + (f", at most {max_pool_fraction:.0%} of the pool left"
                                                      if limit < asked else ""))
    if health is None or health.val_dice is None:
        return PseudoGate(asked, 0, pool_left, "no pseudo-labels: the model's validation Dice is unknown")
    if not health.useful:
        return PseudoGate(asked, 0, pool_left,
                          f"no pseudo-labels: validation Dice {health.val_dice:.3f} is no better than a constant "
                          f"mask ({health.constant_dice:.3f})")
    if health.val_dice < min_val_dice:
        return PseudoGate(asked, 0, pool_left, f"no pseudo-labels: validation Dice {health.val_dice:.3f} is below "
                                               f"the gate's {min_val_dice:.2f}")
    cap = int(np.floor(max_pool_fraction * pool_left))
    if asked > cap:
        return PseudoGate(asked, cap, pool_left, f"{cap} of {asked} pseudo-labels: at most "
                                                 f"{max_pool_fraction:.0%} of the {pool_left} pool images left")
    return PseudoGate(asked, asked, pool_left, f"{asked} pseudo-labels: validation Dice {health.val_dice:.3f} "
                                               f"passes the gate ({min_val_dice:.2f})")
