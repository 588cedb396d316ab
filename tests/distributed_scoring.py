"""Scores a real LGG pool with a fixed model, then selects with CEAL: run by tests/test_distributed.py
as one process (``python``) and as two gloo processes (``torchrun --nproc-per-node 2``).

Writes OUT (a .npz) from rank 0: the scores, the pseudo-label masks and the selected ids.
Usage: distributed_scoring.py DATA OUT BATCH_SIZE
"""
import sys

import numpy as np
import torch

from alseg import distributed
from alseg.active.strategies import make_strategy
from alseg.active.uncertainty import mc_dropout
from alseg.data import load_cached, open_dataset
from alseg.model import ModelConfig, UNet
from alseg.runtime import Normalizer


def main(data_path: str, out: str, batch_size: int) -> None:
    distributed.init_from_env()
    data = load_cached(open_dataset(data_path), 32)
    torch.manual_seed(0)  # the same weights in every process
    model = UNet(ModelConfig(in_channels=data.images.shape[-1], width=4, depth=3, dropout=0.3))
    pool = np.arange(0, len(data.images), 3)[:90]  # not contiguous: keys are dataset positions
    normalizer = Normalizer.fit(data.images[pool])
    result = mc_dropout(model, data.images, pool, normalizer, passes=4, batch_size=batch_size, seed=123,
                        precision="fp32", keep_masks=True, masks=data.masks)
    ids = [data.ids[i] for i in pool]
    inputs = {**result.scores(), "group": np.array([data.groups[i] for i in pool], dtype=object)}
    selection = make_strategy("ceal").select(inputs, ids, 1, np.random.default_rng(5))
    if distributed.is_writer():
        np.savez(out, variance=result.variance, entropy=result.entropy, bald=result.bald, dice=result.dice,
                 foreground=result.foreground, packed=result.packed_masks, expert=np.array(selection.expert_ids),
                 pseudo=np.array(selection.pseudo_ids))
    distributed.shutdown()
    distributed.exit_process(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
