"""Reading a volume into the cache (issue 30): a 256 x 256 x 150 NIfTI volume with its mask,
from the file to working-size pixels in a fresh cache, as ``alseg init`` / ``alseg run`` do.

The volume is generated (smooth random intensities, int16 like an MRI export, gzip-compressed
as labs store them; a 3D mask), written once, then read ``--repeats`` times into a new cache
folder each time: ``open_dataset`` (headers) and ``load_cached`` (every slice decoded,
normalised per volume, resized, written) timed together; the best and the median are
reported. Also the same for a 4D file with 3 channels. Target: under 2 s for the 3D volume.

    .venv/bin/python benchmarks/volume_read.py --size 128 --repeats 3 --json benchmarks/results/cpu-volume-read.json
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from machine import emit, machine_info

SHAPE = (256, 256, 150)


def _write(folder: Path, channels: int) -> None:
    import nibabel as nib
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    vol = gaussian_filter(rng.normal(size=SHAPE), 3)
    vol = ((vol - vol.min()) / np.ptp(vol) * 2000).astype(np.int16)
    image = vol if channels == 1 else np.stack([vol, vol[::-1], vol[:, ::-1]], axis=-1)
    affine = np.diag([0.9, 0.9, 1.0, 1.0])
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(image, affine), folder / "case.nii.gz")
    nib.save(nib.Nifti1Image((vol > 1200).astype(np.uint8), affine), folder / "case_mask.nii.gz")


def _time_read(folder: Path, size: int, repeats: int) -> dict:
    from alseg.data import load_cached, open_dataset
    from alseg.data.volumes import clear_cache

    seconds = []
    for _ in range(repeats):
        clear_cache()  # no header or decoded volume kept from the previous read
        with tempfile.TemporaryDirectory() as cache:
            t0 = time.perf_counter()
            data = load_cached(open_dataset(folder), size, cache_dir=cache)
            seconds.append(time.perf_counter() - t0)
    return {"slices": len(data.ids), "channels": data.channels, "best_s": round(min(seconds), 3),
            "median_s": round(statistics.median(seconds), 3), "all_s": [round(s, 3) for s in seconds]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128, help="working size (px)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    out = {"machine": machine_info(), "shape": list(SHAPE), "size": args.size}
    with tempfile.TemporaryDirectory() as tmp:
        for channels in (1, 3):
            folder = Path(tmp) / f"c{channels}"
            _write(folder, channels)
            out[f"{channels}ch"] = {"file_mb": round(sum(f.stat().st_size for f in folder.iterdir()) / 1e6, 1),
                                    **_time_read(folder, args.size, args.repeats)}
    emit(out, args.json)


if __name__ == "__main__":
    main()
