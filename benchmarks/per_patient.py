"""Per-patient Dice of a run's round models: which patients a seed's figure is made of.

For each given round of an active run (a study's ``runs/<strategy>-s<seed>``), the kept model
(``checkpoints/round-NNN/best.pt``) predicts the run's validation and test images (dropout off,
as the run's test Dice); printed per split: the mean Dice per image, and per group (LGG patient)
its mean Dice per image and its image count. Reads the run's store and data; writes nothing.

    .venv/bin/python benchmarks/per_patient.py /work/studies31/lgg-default/runs/ceal-s0 0 1 2 3
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    import torch

    from alseg.config import config_from_dict
    from alseg.data.splits import Split
    from alseg.metrics import dice_per_image
    from alseg.rundata import open_run_data
    from alseg.store import RunStore
    from alseg.train import Checkpoint, predict_probs

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("rounds", type=int, nargs="+")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with RunStore.open_readonly(args.run) as store:  # the run's own cache, as the loop opens it
        cache_dir = config_from_dict(store.config()).data.cache_dir
        split, data = Split.from_dict(store.split()), open_run_data(store, cache_dir).data
    for rnd in args.rounds:
        checkpoint = Checkpoint.load(args.run / "checkpoints" / f"round-{rnd:03d}" / "best.pt")
        for name, ids in (("val", split.val), ("test", split.test)):
            idx = data.indices(list(ids))
            pred = predict_probs(checkpoint.model, data.images[idx], checkpoint.normalizer) > 0.5
            dice = dice_per_image(pred, data.masks[idx] > 0)
            groups = np.array([data.groups[i] for i in idx])
            per = ", ".join(f"{g} {dice[groups == g].mean():.2f} ({int((groups == g).sum())})"
                            for g in dict.fromkeys(groups))
            print(f"round {rnd} {name}: {dice.mean():.3f}; {per}")


if __name__ == "__main__":
    main()
