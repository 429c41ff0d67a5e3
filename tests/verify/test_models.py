"""Surrogate model registry: builds, shapes, gradients, akamaster weights, errors, torchvision names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from perturbations.errors import ConfigError, WeightsError
from verify.models import AKAMASTER_MEAN, Classifier, Normalize, create_model, list_models

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples" / "cifar10" / "test"
#: the shared data folder beside the checkout (not part of the repository; tests that need it skip without it)
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CIFAR_RESNETS = ["resnet20", "resnet32", "resnet44", "resnet56"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _akamaster(name: str) -> Path | None:
    hits = sorted((SHARED_DATA / "cifar10_resnet_akamaster").glob(f"{name}-*.th"))
    return hits[0] if hits else None


@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_and_trains(name):
    torch.manual_seed(0)
    gray = create_model(name, num_classes=7, in_channels=1, image_size=32).eval()
    with torch.no_grad():
        assert gray(torch.rand(2, 1, 32, 32)).shape == (2, 7)
    model = create_model(name, num_classes=7, in_channels=3, image_size=32)
    x = torch.rand(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 7)
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert isinstance(model, Classifier) and isinstance(model.normalize, torch.nn.Identity)
    assert model.forward_features(x).shape == (2, model.num_features)


def test_list_models():
    assert list_models("resnet*") == ["resnet18", *CIFAR_RESNETS]
    assert list_models("resnet[2-5]*") == CIFAR_RESNETS
    assert "fastcnn" in list_models()
    assert "resnet50" not in list_models()  # torchvision names are not listed
    assert list_models("nope*") == []


@pytest.mark.parametrize("name,widths,pools", [("fastcnn", [16, 32, 64, 128], 3),
                                               ("fastcnn_wide", [32, 64, 128, 256], 3),
                                               ("vgg3", [32, 32, 64, 64, 128, 128], 3)])
def test_fastcnn_architecture_and_sizes(name, widths, pools):
    model = create_model(name, 10).to(memory_format=torch.channels_last)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == widths
    assert all(c.bias is None and c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.modules()) == pools
    for size in (8, 28, 45):
        x = torch.rand(2, 3, size, size).contiguous(memory_format=torch.channels_last)
        assert model(x).shape == (2, 10)
    with pytest.raises(ConfigError):
        create_model(name, 10, image_size=7)


def test_cifar_resnet_structure():
    model = create_model("resnet20", 10)
    names = {n for n, _ in model.named_parameters()}
    assert {"conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer3.2.bn2.bias", "linear.weight"} <= names
    assert not any("shortcut" in n for n in names)  # option A: parameter-free shortcuts
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(0.27e6, rel=0.02)
    assert len(create_model("resnet56", 10).layer2) == 9


def test_resnet18_variants():
    small = create_model("resnet18", 10, image_size=32)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in small.modules())
    big = create_model("resnet18", 10, in_channels=1, image_size=96)
    assert isinstance(big, torchvision.models.ResNet)
    assert big.conv1.in_channels == 1 and big.conv1.kernel_size == (7, 7)
    assert big.eval()(torch.rand(2, 1, 96, 96)).shape == (2, 10)


def test_torchvision_names_build_and_load_local_weights(tmp_path):
    torch.manual_seed(0)
    model = create_model("tv:mobilenet_v3_small", 4, in_channels=1).eval()
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 4)
    plain = create_model("shufflenet_v2_x0_5", 3).eval()  # plain torchvision name, not registered
    assert isinstance(plain, torchvision.models.ShuffleNetV2)
    x = torch.rand(2, 3, 32, 32)
    path = tmp_path / "shuffle.pth"
    torch.save(plain.state_dict(), path)
    again = create_model("tv:shufflenet_v2_x0_5", 3, weights=path).eval()
    assert torch.equal(again(x), plain(x))
    with pytest.raises(WeightsError, match="torchvision docs"):
        create_model("tv:resnet50", 10, weights="DEFAULT")
    with pytest.raises(WeightsError, match="local"):
        create_model("tv:resnet50", 10, weights=True)  # type: ignore[arg-type]


def test_missing_weights_and_unknown_model(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match="weights file not found: .*nope.pth"):
        create_model("resnet20", 10, weights=missing)
    with pytest.raises(ConfigError, match="fastcnn"):
        create_model("no_such_model", 10)
    with pytest.raises(ConfigError):
        create_model("fastcnn", 0)


def test_mismatched_weights(tmp_path):
    path = tmp_path / "fast.pth"
    torch.save(create_model("fastcnn", 10).state_dict(), path)
    with pytest.raises(WeightsError, match="missing keys: conv1.weight"):
        create_model("resnet20", 10, weights=path)
    with pytest.raises(WeightsError, match="shape mismatch"):
        create_model("fastcnn", 5, weights=path)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        create_model("fastcnn", 10, weights=bad)


def _cifar_samples(per_class: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    classes = sorted(p.name for p in SAMPLES.iterdir() if p.is_dir())
    assert len(classes) == 10
    xs, ys = [], []
    for label, cls in enumerate(classes):
        for f in sorted((SAMPLES / cls).glob("*.png"))[:per_class]:
            xs.append(torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0))
            ys.append(label)
    return torch.stack(xs).permute(0, 3, 1, 2).contiguous(), torch.tensor(ys)


def test_akamaster_resnet20_loads_and_classifies(tmp_path):
    weights = _akamaster("resnet20")
    if weights is None:
        pytest.skip(f"akamaster resnet20 checkpoint not found under {SHARED_DATA / 'cifar10_resnet_akamaster'} "
                    "(the shared data folder beside the checkout)")
    if not SAMPLES.is_dir():
        pytest.skip(f"CIFAR-10 samples not found at {SAMPLES}")
    model = create_model("resnet20", 10, weights=weights).eval()
    assert isinstance(model.normalize, Normalize)
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor(AKAMASTER_MEAN))
    x, y = _cifar_samples()
    with torch.no_grad():
        logits = model(x)
    acc = (logits.argmax(1) == y).float().mean().item()
    assert acc >= 0.8, acc
    # Round trip: our own state dict keeps the normalisation prefix.
    path = tmp_path / "r20.pth"
    torch.save(model.state_dict(), path)
    again = create_model("resnet20", 10, weights=path).eval()
    assert isinstance(again.normalize, Normalize)
    with torch.no_grad():
        assert torch.equal(again(x), logits)


@pytest.mark.parametrize("name", ["fastcnn", "fastcnn_wide", "fastcnn_xl"])
def test_quick_learners_stride_their_first_convolution_from_64_px(name):
    """From 64 px up the first convolution has stride 2: the feature maps after it are those of a
    32-px input (the cost of a 32-px cell), and every input pixel still reaches the network."""
    from verify.models import STEM_STRIDE_FROM

    small, big = create_model(name, 5, image_size=STEM_STRIDE_FROM - 1), create_model(name, 5, image_size=64)
    assert [m.stride for m in small.modules() if isinstance(m, torch.nn.Conv2d)][0] == (1, 1)
    strides = [m.stride for m in big.modules() if isinstance(m, torch.nn.Conv2d)]
    assert strides[0] == (2, 2) and set(strides[1:]) == {(1, 1)}
    assert big.features[0](torch.rand(1, 3, 64, 64)).shape == small.features[0](torch.rand(1, 3, 32, 32)).shape
    x = torch.rand(1, 3, 64, 64, requires_grad=True)
    big(x).sum().backward()
    assert bool((x.grad != 0).all())  # a 3x3 kernel at stride 2 covers every pixel
