"""Tests for the model zoo: parameter counts vs. the literature, forward/backward, error messages."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lbtrain.models import MODEL_NAMES, build_model, count_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

CIFAR = (3, 32, 32)
MNIST = (1, 28, 28)




def _f1_param_count(in_features: int = 784, hidden: int = 512, depth: int = 5, classes: int = 10) -> int:
    # each hidden layer: Linear weight + bias, BN gamma + beta
    first = in_features * hidden + hidden + 2 * hidden
    rest = (depth - 1) * (hidden * hidden + hidden + 2 * hidden)
    return first + rest + hidden * classes + classes


@pytest.mark.parametrize(
    ("spec", "num_classes", "input_shape", "expected"),
    [
        ({"name": "resnet_cifar", "depth": 20}, 10, CIFAR, 0.27e6),
        ({"name": "resnet_cifar", "depth": 44}, 10, CIFAR, 0.66e6),
        ({"name": "resnet_cifar", "depth": 56}, 10, CIFAR, 0.85e6),
        ({"name": "resnet_cifar", "depth": 110}, 10, CIFAR, 1.7e6),
        ({"name": "wrn", "depth": 16, "widen": 4}, 10, CIFAR, 2.75e6),
        ({"name": "fc", "hidden": 512, "depth": 5}, 10, MNIST, _f1_param_count()),
        ({"name": "torchvision", "arch": "resnet50"}, 1000, (3, 224, 224), 25.56e6),
    ],
    ids=["resnet20", "resnet44", "resnet56", "resnet110", "wrn16-4", "fc-F1", "resnet50"],
)
def test_parameter_counts_match_literature(spec, num_classes, input_shape, expected) -> None:
    n = count_parameters(build_model(spec, num_classes, input_shape))
    assert abs(n - expected) / expected < 0.02, f"{spec}: {n} params, expected ~{expected:.0f}"


def test_fc_f1_count_is_exact() -> None:
    assert count_parameters(build_model({"name": "fc"}, 10, MNIST)) == _f1_param_count()


# one small-but-representative config per registered name
FORWARD_CASES = {
    "fc": ({"name": "fc"}, 10, MNIST),
    "shallow": ({"name": "shallow"}, 100, CIFAR),
    "resnet_cifar": ({"name": "resnet_cifar", "depth": 20}, 10, CIFAR),
    "wrn": ({"name": "wrn", "depth": 10, "widen": 2, "dropout": 0.3}, 10, CIFAR),
    "vgg": ({"name": "vgg"}, 10, CIFAR),
    "torchvision": ({"name": "torchvision", "arch": "resnet18"}, 7, (3, 64, 64)),
}


def test_every_registered_name_is_covered() -> None:
    assert set(FORWARD_CASES) == set(MODEL_NAMES)


def _forward_backward(model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    model.train()
    logits = model(x)
    assert logits.shape == (x.shape[0], num_classes)
    logits.float().logsumexp(1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {name}"


@pytest.mark.parametrize("name", sorted(FORWARD_CASES))
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    spec, num_classes, shape = FORWARD_CASES[name]
    model = build_model(spec, num_classes, shape)
    _forward_backward(model, torch.randn(4, *shape), num_classes)


@pytest.mark.parametrize("name", ["resnet_cifar", "shallow"])
def test_channels_last_matches_contiguous(name: str) -> None:
    torch.manual_seed(0)
    spec, num_classes, shape = FORWARD_CASES[name]
    model = build_model(spec, num_classes, shape).eval()
    x = torch.randn(4, *shape)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    x_cl = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x_cl), expected, rtol=1e-4, atol=1e-4)
    _forward_backward(model, x_cl, num_classes)


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (3, 40, 24)])
def test_conv_nets_accept_other_input_sizes(shape: tuple[int, int, int]) -> None:
    for spec in ({"name": "shallow"}, {"name": "resnet_cifar", "depth": 20}, {"name": "vgg", "depth": 11}):
        model = build_model(spec, 10, shape).eval()
        assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_resnet_shortcuts_are_parameter_free() -> None:
    # option A: only convs, BN and the final Linear carry parameters
    model = build_model({"name": "resnet_cifar", "depth": 20}, 10, CIFAR)
    kinds = {type(m) for m in model.modules() if any(True for _ in m.parameters(recurse=False))}
    assert kinds == {nn.Conv2d, nn.BatchNorm2d, nn.Linear}


def test_uses_plain_batchnorm() -> None:
    model = build_model({"name": "shallow"}, 10, CIFAR)
    kinds = [type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds.count(nn.BatchNorm2d) == 2 and kinds.count(nn.BatchNorm1d) == 2


@pytest.mark.parametrize(
    "raw", [{"name": "resnet_cifar", "depth": 32}, {"name": "resnet_cifar", "kwargs": {"depth": 32}}]
)
def test_accepts_flat_nested_and_omegaconf_specs(raw: dict) -> None:
    omegaconf = pytest.importorskip("omegaconf")
    for spec in (raw, omegaconf.OmegaConf.create(raw)):
        assert count_parameters(build_model(spec, 10, CIFAR)) == 464_154  # ResNet-32, ~0.46M


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"name": "nope"}, r"unknown model name 'nope'.*resnet_cifar"),
        ({}, r"unknown model name None"),
        ({"name": "resnet_cifar", "depth": 21}, r"6n\+2.*got 21"),
        ({"name": "wrn", "depth": 17}, r"6n\+4.*got 17"),
        ({"name": "vgg", "depth": 15}, r"\[11, 13, 16, 19\].*got 15"),
        ({"name": "resnet_cifar", "detph": 20}, r"unknown option.*detph.*depth"),
        ({"name": "wrn", "kwargs": {"detph": 16}}, r"unknown option.*detph.*depth"),
        ({"name": "wrn", "depth": 16, "kwargs": {"depth": 22}}, r"both at top level and under 'kwargs'"),
        ({"name": "torchvision", "arch": "resnet51"}, r"unknown classification arch 'resnet51'"),
    ],
)
def test_bad_specs_raise_value_error(spec: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(spec, 10, CIFAR)
