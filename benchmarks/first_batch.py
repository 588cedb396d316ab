"""A volume project's first batch (issue 30): what leaving out the mostly-air slices changes.

A project over volumes without masks asks the expert for a first batch drawn at random, one
volume after another (``alseg.active.coldstart.spread_selection``). The slices whose tissue
covers less than ``TISSUE_SHARE`` of their volume's fullest slice are left out of it
(``tissue_candidates``). This measures, on the LGG patients in ``../shared/data`` as whole volumes
(every slice, the 128 px cache a project reads), how many slices the rule leaves out, how many
tumour slices are among them, and over ``--draws`` seeded first batches of 10, 20 and 40 slices
with and without the rule: the share of tumour slices in a batch and how often a batch holds none
(a first model learns nothing from a batch of empty masks). Pure selection: nothing is trained.

    .venv/bin/python benchmarks/first_batch.py --draws 2000 --json benchmarks/results/cpu-first-batch-lgg.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from machine import emit, machine_info

LGG = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lgg"
SIZES = (10, 20, 40)


def main() -> None:
    from alseg.active.coldstart import TISSUE_SHARE, spread_selection, tissue_candidates
    from alseg.data import load_cached, open_dataset

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=LGG)
    ap.add_argument("--size", type=int, default=128, help="working size (px), as quick-lgg-volume")
    ap.add_argument("--draws", type=int, default=2000, help="seeded first batches per batch size and rule")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    dataset = open_dataset(args.data)
    data = load_cached(dataset, args.size)
    ids, groups = list(data.ids), list(data.groups)
    tumour = dict(zip(ids, data.masks.reshape(len(ids), -1).max(1) > 0))
    kept = tissue_candidates(data.images, ids, data.indices(ids), groups, max(SIZES))
    left_out = sorted(set(ids) - set(kept))
    out = {"machine": machine_info(), "data": str(args.data), "size": args.size, "draws": args.draws,
           "tissue_share": TISSUE_SHARE, "volumes": len(set(groups)), "slices": len(ids),
           "tumour_slices": int(sum(tumour.values())), "left_out": len(left_out),
           "tumour_slices_left_out": int(sum(tumour[i] for i in left_out)), "batches": []}
    group_of, air_ids = dict(zip(ids, groups)), set(left_out)
    for n in SIZES:
        for rule, pool in (("random over volumes", ids), ("without mostly-air slices", kept)):
            share, none, air = [], 0, []
            for draw in range(args.draws):
                batch = spread_selection(pool, [group_of[i] for i in pool], n, np.random.default_rng(draw))
                hits = sum(tumour[i] for i in batch)
                share.append(hits / n)
                none += hits == 0
                air.append(sum(i in air_ids for i in batch) / n)
            out["batches"].append({"n": n, "rule": rule, "tumour_share": round(float(np.mean(share)), 4),
                                   "no_tumour_slice": round(none / args.draws, 4),
                                   "mostly_air_share": round(float(np.mean(air)), 4)})
    emit(out, args.json)


if __name__ == "__main__":
    main()
