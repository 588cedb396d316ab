"""Seeded, grouped splits and the paper's presets."""
import pytest

from alseg.data import load_cached, open_dataset
from alseg.data.splits import Split, make_split
from alseg.errors import AlsegError
from conftest import ISIC, LGG


def _split(data, **kw):
    return make_split(data.ids, has_mask=data.has_mask, positive=data.positive, groups=data.groups,
                      subsets=data.subsets, **kw)


@pytest.fixture(scope="module")
def lgg():
    return load_cached(open_dataset(LGG), 32)


@pytest.fixture(scope="module")
def isic():
    return load_cached(open_dataset(ISIC), 32)


def test_isic_preset_carves_test_from_training_pairs(isic):
    s = _split(isic, preset="isic", seed=0)
    assert s.counts() == {"train": 1230, "val": 308, "test": 462, "labelled": 461, "pool": 769}
    everything = set(s.train) | set(s.val) | set(s.test)
    assert len(everything) == 2000 and all(isic.has_mask[i] for i in isic.indices(sorted(everything)))
    assert set(s.labelled) | set(s.pool) == set(s.train) and not set(s.labelled) & set(s.pool)
    assert any("carved" in n for n in s.notes)


def test_isic_official_test_with_masks_is_the_test_split():
    ids = [f"t{i}" for i in range(100)] + [f"x{i}" for i in range(30)]
    subsets = ["training"] * 100 + ["test"] * 30
    s = make_split(ids, has_mask=[True] * 130, positive=[True] * 130, subsets=subsets, preset="isic", seed=3)
    assert sorted(s.test) == sorted(ids[100:])
    assert (len(s.train), len(s.val)) == (80, 20) and len(s.labelled) == 30


def test_lgg_preset_positive_slices_split_by_patient(lgg):
    s = _split(lgg, preset="lgg", seed=0)
    n = sum(s.counts()[k] for k in ("train", "val", "test"))
    assert n == 360
    assert all(lgg.positive[i] for i in lgg.indices(list(s.train + s.val + s.test)))
    patients = {name: {lgg.groups[i] for i in lgg.indices(list(getattr(s, name)))} for name in ("train", "val", "test")}
    assert not patients["train"] & patients["test"] and not patients["train"] & patients["val"]
    assert not patients["val"] & patients["test"]
    assert s.split_by == "group"
    # close to the paper's 80/20 then 80/20 proportions (whole patients, so not exact)
    assert abs(len(s.test) - 72) <= 15 and abs(len(s.val) - 58) <= 15
    assert len(s.labelled) == round(0.375 * len(s.train))


def test_lgg_volume_preset_keeps_whole_patients_with_their_empty_slices(lgg):
    s = _split(lgg, preset="lgg-volume", seed=0)
    parts = {name: list(getattr(s, name)) for name in ("train", "val", "test")}
    assert sum(map(len, parts.values())) == 1073  # every slice of the 31 patients, not only the 360 with tumour
    patients = {name: {lgg.groups[i] for i in lgg.indices(ids)} for name, ids in parts.items()}
    assert sum(map(len, patients.values())) == 31 and not (patients["train"] & patients["test"])
    assert not (patients["train"] & patients["val"]) and not (patients["val"] & patients["test"])
    every_slice = {name: sum(1 for g in lgg.groups if g in patients[name]) for name in parts}
    assert every_slice == {name: len(ids) for name, ids in parts.items()}  # each patient whole
    for name, ids in parts.items():  # tumour-free slices in every part
        assert not all(lgg.positive[i] for i in lgg.indices(ids)), name
    assert abs(len(s.test) - 0.2 * 1073) <= 60


def test_sample_split_reproduces_slice_level_proportions(lgg):
    s = _split(lgg, preset="lgg", seed=0, split_by="sample")
    assert s.split_by == "sample" and (len(s.test), len(s.val), len(s.train)) == (72, 58, 230)


def test_seeded_and_serialisable(lgg):
    a, b, c = (_split(lgg, preset="lgg", seed=k) for k in (1, 1, 2))
    assert a == b and a.test != c.test
    assert Split.from_dict(a.to_dict()) == a


@pytest.mark.parametrize("preset", ["lgg", "lgg-volume"])
def test_one_test_set_for_every_seed(lgg, preset):
    """A fixed test seed: seeds differ in validation and labelled set, never in test, and no seed's
    validation holds another seed's test images (the leak issue 31 found)."""
    splits = [_split(lgg, preset=preset, seed=k, test_seed=0) for k in range(4)]
    assert len({s.test for s in splits}) == 1 and len({s.val for s in splits}) > 1
    assert len({s.labelled for s in splits}) == 4
    test = set(splits[0].test)
    assert all(not (set(s.val) | set(s.train)) & test for s in splits)
    assert _split(lgg, preset=preset, seed=0, test_seed=0) == _split(lgg, preset=preset, seed=0)
    free = [_split(lgg, preset=preset, seed=k) for k in range(4)]  # without it, each seed its own test set
    assert len({s.test for s in free}) > 1


def test_bad_split_requests():
    with pytest.raises(AlsegError, match="split preset"):
        make_split(["a"], has_mask=[True], positive=[True], preset="nope")
    with pytest.raises(AlsegError, match="at least 3"):
        make_split(["a", "b"], has_mask=[True, True], positive=[True, True])


def test_runs_of_any_seed_share_the_test_split_by_default(tmp_path):
    from alseg.config import build_config
    from alseg.rundata import prepare_data

    def split(seed, config_file=None):
        return prepare_data(build_config("quick-lgg", config_file, overrides={
            "seed": seed, "data": {"path": str(LGG), "size": 32}})).split
    a, b = split(0), split(1)
    assert a.test == b.test and a.val != b.val
    per_seed = tmp_path / "per-seed.yaml"
    per_seed.write_text("data:\n  test_seed: null\n")  # restores a test set drawn by each seed
    assert split(1, per_seed).test != a.test and split(0, per_seed).test == a.test
