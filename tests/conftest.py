"""Shared fixtures: the real data in ../shared/data, a session-wide pixel cache, CLI runner."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ISIC = SHARED / "isic"
LGG = SHARED / "lgg" / "kaggle_3m"
UNGATED = ROOT / "tests" / "ceal_ungated.yaml"  # CEAL's pseudo-label rule, for tiny models that earn none


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One decoded-pixel cache for the whole session, so real data is decoded once per size."""
    path = tmp_path_factory.mktemp("alseg-cache")
    os.environ["ALSEG_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(autouse=True)
def _use_cache(cache_dir):
    yield


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    """An untrained, tiny MC-dropout U-Net at 32 px: enough to exercise predict's files, not its quality."""
    import torch

    from alseg import Checkpoint, ModelConfig, UNet
    from alseg.runtime import Normalizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    Checkpoint(UNet(ModelConfig(width=4, depth=3, dropout=0.3)), Normalizer((0.5,) * 3, (0.25,) * 3), 32).save(path)
    return path


def run_cli(*args: str, check: bool = True, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "alseg", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"alseg {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def run_json(*args: str) -> dict:
    return json.loads(run_cli(*args, "--json").stdout)


# --- the review project (tests/annotate_fixtures.py): one template per session, a copy per test ---
@pytest.fixture(scope="session")
def template(tmp_path_factory):
    """(template project with an open batch of 8, the batch's true masks); never written by tests."""
    from annotate_fixtures import build_project

    return build_project(tmp_path_factory)


@pytest.fixture
def project(template, tmp_path):
    """(a fresh copy of the template project, its batch's true masks)."""
    from annotate_fixtures import copy_project

    return copy_project(template[0], tmp_path / "project"), template[1]


@pytest.fixture
def project_dir(project) -> Path:
    return project[0]


@pytest.fixture
def opened(project_dir):
    """The copy opened as the review server opens it (holding the writer lock)."""
    from alseg.project import Project

    p = Project(project_dir, command="serve")
    yield p
    p.close()


@pytest.fixture(scope="session")
def lgg_nifti(tmp_path_factory) -> dict:
    """Three LGG patients as NIfTI (tests/volume_fixtures.py): ``nnunet``, ``flat`` and ``truth``."""
    from volume_fixtures import build_lgg_nifti

    return build_lgg_nifti(tmp_path_factory.mktemp("lgg-nifti"))
