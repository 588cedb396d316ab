"""The MC-dropout engine against a direct computation from stored passes, on real LGG slices."""
import numpy as np
import pytest
import torch

from alseg.data import load_cached, open_dataset
from alseg.errors import AlsegError
from alseg.model import ModelConfig, UNet, seeded_dropout, set_mc_dropout
from alseg.runtime import Normalizer
from alseg.active.uncertainty import edt_weight, mc_dropout, pass_generators
from conftest import LGG


@pytest.fixture(scope="module")
def lgg():
    data = load_cached(open_dataset(LGG), 32)
    idx = np.flatnonzero(data.positive)[:6]
    return data, idx, Normalizer.fit(data.images[idx])


def _model(dropout):
    torch.manual_seed(0)
    return UNet(ModelConfig(width=4, depth=3, dropout=dropout, norm="batch"))


def test_zero_dropout_gives_zero_variance_and_bald(lgg):
    data, idx, norm = lgg
    res = mc_dropout(_model(0.0), data.images, idx, norm, passes=5, precision="fp32", keep_maps=True)
    assert np.all(res.variance == 0) and np.all(res.bald < 1e-4)
    assert np.all(res.entropy > 0)


def test_scores_equal_direct_computation_from_stored_passes(lgg):
    data, idx, norm = lgg
    model = _model(0.3)
    res = mc_dropout(model, data.images, idx, norm, passes=7, batch_size=len(idx), precision="fp32", seed=11,
                     keep_maps=True)
    # the same passes, stored: same seed, same single batch
    set_mc_dropout(model)
    x = norm(torch.from_numpy(np.ascontiguousarray(data.images[idx])))
    with torch.no_grad():
        probs = []
        for t in range(1, 8):  # pass t of image k draws its masks from the generator seeded (11, k, t)
            with seeded_dropout(pass_generators(11, idx, t)):
                probs.append(torch.sigmoid(model(x.contiguous(memory_format=torch.channels_last)))[:, 0])
        probs = torch.stack(probs).double().numpy()
    p = np.clip(probs, 1e-6, 1 - 1e-6)
    h = lambda q: -(q * np.log(q) + (1 - q) * np.log(1 - q))
    mean = probs.mean(0)
    var = probs.var(0)
    assert np.allclose(res.mean, mean, atol=1e-5)
    assert np.allclose(res.variance_map, var, atol=1e-6)
    assert np.allclose(res.variance, var.reshape(len(idx), -1).sum(1), rtol=1e-4)
    assert np.allclose(res.entropy, h(np.clip(mean, 1e-6, 1 - 1e-6)).reshape(len(idx), -1).sum(1), rtol=1e-4)
    bald = np.clip(h(np.clip(mean, 1e-6, 1 - 1e-6)) - h(p).mean(0), 0, None)
    assert np.allclose(res.bald, bald.reshape(len(idx), -1).sum(1), rtol=1e-3, atol=1e-3)
    assert np.all(res.variance > 0)


def test_deterministic_for_a_seed_and_streams_without_maps(lgg):
    data, idx, norm = lgg
    model = _model(0.3)
    a = mc_dropout(model, data.images, idx, norm, passes=4, batch_size=2, seed=3)
    b = mc_dropout(model, data.images, idx, norm, passes=4, batch_size=2, seed=3)
    c = mc_dropout(model, data.images, idx, norm, passes=4, batch_size=2, seed=4)
    assert np.array_equal(a.variance, b.variance) and not np.array_equal(a.variance, c.variance)
    assert a.mean is None and a.variance_map is None
    assert model.training  # the engine restores the model's mode
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    mc_dropout(model, data.images, idx, norm, passes=2, seed=9)
    assert torch.equal(torch.rand(3), expected)  # the caller's random state is left alone


def test_edt_weighting_uses_the_thresholded_mask(lgg):
    from scipy.ndimage import distance_transform_edt

    mask = np.zeros((16, 16), bool)
    mask[4:12, 3:10] = True
    w = edt_weight(mask)
    d = distance_transform_edt(mask)
    assert np.allclose(w, d / d.max()) and w[~mask].max() == 0
    assert not edt_weight(np.zeros((8, 8), bool)).any()
    data, idx, norm = lgg
    res = mc_dropout(_model(0.3), data.images, idx, norm, passes=3, weighting="edt", keep_maps=True)
    for k in range(len(idx)):
        assert np.all(res.variance_map[k][res.mean[k] <= 0.5] == 0)
    with pytest.raises(AlsegError):
        mc_dropout(_model(0.3), data.images, idx, norm, passes=1)


@pytest.mark.parametrize("scope, fixed", [("all", 0), ("decoder", 3), ("bottleneck", 3)])
def test_encoder_without_dropout_runs_once_with_the_result_of_whole_passes(lgg, scope, fixed):
    """With dropout only in the decoder (or bottleneck), the deterministic encoder levels run once per
    batch: same scores and maps as T whole passes with the same seed, and T times fewer encoder calls."""
    data, idx, norm = lgg
    torch.manual_seed(0)
    model = UNet(ModelConfig(width=4, depth=4, dropout=0.3, dropout_scope=scope, norm="batch"))
    assert model.deterministic_levels() == fixed
    calls = []
    hook = model.down[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        fast = mc_dropout(model, data.images, idx, norm, passes=6, batch_size=3, precision="fp32", seed=4, keep_maps=True)
    finally:
        hook.remove()
    assert len(calls) == (2 if fixed else 12)  # 2 batches: once each, or once per pass
    # the reference: whole passes through forward(), the same dropout stream
    set_mc_dropout(model)
    probs = []
    for start in range(0, len(idx), 3):
        x = norm(torch.from_numpy(np.ascontiguousarray(data.images[idx[start:start + 3]])))
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            passes = []
            for t in range(1, 7):
                with seeded_dropout(pass_generators(4, idx[start:start + 3], t)):
                    passes.append(torch.sigmoid(model(x))[:, 0])
            probs.append(torch.stack(passes).numpy())
    probs = np.concatenate(probs, axis=1)
    assert np.allclose(fast.mean, probs.mean(0), atol=1e-5)
    assert np.allclose(fast.variance_map, probs.var(0), atol=1e-6)
    assert np.all(fast.variance > 0)
