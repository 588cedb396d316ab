"""The paper's U-Net: size, shapes, dropout scopes, MC-dropout mode."""
import pytest
import torch
from torch import nn

from alseg.errors import AlsegError
from alseg.model import ModelConfig, UNet, count_parameters, set_mc_dropout
from conftest import run_json


def test_paper_size_parameter_count():
    assert count_parameters(UNet(ModelConfig(in_channels=3, width=64, depth=5))) == 31_031_745
    assert run_json("model", "summary", "--width", "64", "--depth", "5", "--in-channels", "3")["parameters"] == 31_031_745


@pytest.mark.parametrize("depth,channels", [(5, 3), (3, 1), (4, 4)])
def test_output_is_one_logit_map_of_input_size(depth, channels):
    model = UNet(ModelConfig(in_channels=channels, width=4, depth=depth))
    assert model(torch.zeros(2, channels, 32, 32)).shape == (2, 1, 32, 32)


def test_input_size_must_fit_the_depth():
    with pytest.raises(AlsegError, match="multiple of 16"):
        UNet(ModelConfig(width=4, depth=5))(torch.zeros(1, 3, 40, 40))


@pytest.mark.parametrize("scope,expected", [("all", 9), ("decoder", 5), ("bottleneck", 1)])
def test_dropout_scopes(scope, expected):
    model = UNet(ModelConfig(width=4, depth=5, dropout=0.3, dropout_scope=scope))
    active = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    assert len(active) == expected


def test_mc_mode_keeps_dropout_on_and_normalisation_in_eval():
    torch.manual_seed(0)
    model = UNet(ModelConfig(width=4, depth=3, dropout=0.5, norm="batch"))
    x = torch.randn(1, 3, 16, 16)
    set_mc_dropout(model)
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x))
    set_mc_dropout(model, enabled=False)
    with torch.no_grad():
        assert torch.allclose(model(x), model(x))


def test_bad_model_options():
    for kw in ({"dropout": 1.0}, {"dropout_scope": "encoder"}, {"norm": "layer"}, {"depth": 0}):
        with pytest.raises(AlsegError):
            ModelConfig(**kw)
