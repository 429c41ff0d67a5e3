"""Surrogate registry: specs, bundled CIFAR ResNet-20 features, resizing, grey input, gradients,
keyed random init, weight hashes, one-line offline errors, torchvision and open_clip loading."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from perturbations import surrogates
from perturbations.errors import ConfigError, ProtectError, WeightsError
from perturbations.keyring import Keyring
from perturbations.surrogates import SURROGATE_KINDS, Surrogate, load_surrogate, parse_spec

REPO = Path(__file__).resolve().parents[2]
#: Held-out CIFAR-10 images: the akamaster nets were trained on the training split (and reach 100 %
#: nearest-class-mean accuracy there), so class separation is measured on the test split.
SAMPLES = REPO / "samples" / "cifar10" / "test"
BUNDLED_SHA = "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def resnet20() -> Surrogate:
    return load_surrogate("cifar-resnet20")


@pytest.fixture(scope="module")
def cifar() -> tuple[torch.Tensor, torch.Tensor]:
    """10 test images per class (100), ``N x 3 x 32 x 32`` in [0, 1], and their labels."""
    classes = sorted(p.name for p in SAMPLES.iterdir() if p.is_dir())
    assert len(classes) == 10
    xs, ys = [], []
    for label, cls in enumerate(classes):
        for f in sorted((SAMPLES / cls).glob("*.png"))[:10]:
            xs.append(torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0))
            ys.append(label)
    return torch.stack(xs).permute(0, 3, 1, 2).contiguous(), torch.tensor(ys)


def _ncm_accuracy(f: torch.Tensor, y: torch.Tensor) -> float:
    """Leave-one-out nearest-class-mean accuracy of features ``f`` (``N x D``)."""
    correct = 0
    for i in range(len(y)):
        rest = torch.ones(len(y), dtype=torch.bool)
        rest[i] = False
        means = torch.stack([f[rest & (y == c)].mean(0) for c in range(int(y.max()) + 1)])
        correct += int(((f[i] - means) ** 2).sum(1).argmin() == y[i])
    return correct / len(y)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert isinstance(e.value, ProtectError) and "\n" not in msg and msg
    return msg


# --------------------------------------------------------------------------------------------
# Specs


@pytest.mark.parametrize("spec,parsed", [
    ("cifar-resnet20", ("cifar-resnet", "resnet20", None)),
    ("cifar-resnet56:w/r56.th", ("cifar-resnet", "resnet56", "w/r56.th")),
    ("cifar-resnet32:C:\\w\\r.th", ("cifar-resnet", "resnet32", "C:\\w\\r.th")),
    ("clip:RN50", ("clip", "RN50", None)),
    ("clip:RN50/openai", ("clip", "RN50", "openai")),
    ("clip:ViT-B-32//abs/vit.pt", ("clip", "ViT-B-32", "/abs/vit.pt")),
    ("torchvision:resnet50", ("torchvision", "resnet50", None)),
    ("torchvision:resnet50:/w/rn50.pth", ("torchvision", "resnet50", "/w/rn50.pth")),
    ("random:tiny", ("random", "tiny", None)),
    ("random:cifar-resnet44", ("random", "cifar-resnet44", None)),
])
def test_parse_spec(spec, parsed):
    assert parse_spec(spec) == parsed
    assert parsed[0] in SURROGATE_KINDS


@pytest.mark.parametrize("spec", ["", "  ", "cifar-resnet18", "cifar-resnet020", "cifar-resnet20:", "clip", "clip:",
                                  "clip:/openai", "clip:RN50/", "torchvision", "torchvision:resnet50:", "random",
                                  "random:resnet20", "random:tiny:x", "vgg16", "resnet20:w.th", None])
def test_bad_specs(spec):
    with pytest.raises(ConfigError) as e:
        parse_spec(spec)
    _one_line(e)
    with pytest.raises(ConfigError):
        load_surrogate(spec)


def test_unknown_kind_lists_kinds():
    with pytest.raises(ConfigError, match="cifar-resnet, clip, torchvision, random"):
        parse_spec("vgg:foo")


# --------------------------------------------------------------------------------------------
# Bundled CIFAR ResNet-20


def test_bundled_resnet20(resnet20):
    s = resnet20
    assert s.spec == "cifar-resnet20:samples/weights/resnet20-12fca82f.th"
    assert s.input_size == (32, 32) and s.feature_dim == 64 and s.device == torch.device("cpu")
    assert s.weights_sha256 == BUNDLED_SHA
    assert s.weights_path == REPO / "samples" / "weights" / "resnet20-12fca82f.th"
    assert not s.module.training and not any(p.requires_grad for p in s.module.parameters())
    assert s.to("cpu") is s
    # The canonical spec loads the same file from any working directory.
    again = load_surrogate(s.spec)
    assert again.spec == s.spec and again.weights_sha256 == BUNDLED_SHA


def test_resnet20_features_separate_classes(resnet20, cifar):
    x, y = cifar
    f = resnet20.features(x)
    assert f.shape == (100, 64) and f.dtype == torch.float32
    # Measured: 0.90 at 32 px, 0.83 upsampled to 64 px, 0.86 grey (random init: 0.14-0.21; chance 0.10).
    assert _ncm_accuracy(f, y) >= 0.6
    big = torch.nn.functional.interpolate(x, size=(64, 48), mode="bilinear", align_corners=False)
    assert _ncm_accuracy(resnet20.features(big), y) >= 0.5
    assert _ncm_accuracy(resnet20.features(x.mean(1, keepdim=True)), y) >= 0.5


def test_any_size_grey_and_batches(resnet20):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 40, 27, generator=gen)
    resized = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(resnet20.features(x), resnet20.features(resized))
    grey = torch.rand(3, 1, 32, 32, generator=gen)
    assert torch.allclose(resnet20.features(grey), resnet20.features(grey.repeat(1, 3, 1, 1)), atol=1e-5)
    batched = resnet20.batch_features(x, batch_size=2)
    assert batched.shape == (5, 64) and not batched.requires_grad
    assert torch.allclose(batched, resnet20.features(x), atol=1e-5)
    assert resnet20.batch_features(x[:0]).shape == (0, 64)
    for bad in (torch.rand(2, 2, 32, 32), torch.rand(3, 32, 32), torch.zeros(1, 3, 32, 32, dtype=torch.uint8)):
        with pytest.raises(ConfigError):
            resnet20.features(bad)
    with pytest.raises(ConfigError):
        resnet20.batch_features(x, batch_size=0)


def test_features_are_differentiable(resnet20):
    x = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1), requires_grad=True)
    resnet20.features(x).square().sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None for p in resnet20.module.parameters())


def test_weights_paths_and_conflicts(tmp_path, resnet20):
    copy = tmp_path / "r20.th"
    copy.write_bytes(resnet20.weights_path.read_bytes())
    s = load_surrogate("cifar-resnet20", weights=copy)
    assert s.spec == f"cifar-resnet20:{copy}" and s.weights_sha256 == BUNDLED_SHA
    assert load_surrogate(f"cifar-resnet20:{copy}", weights=str(copy)).weights_sha256 == BUNDLED_SHA
    with pytest.raises(ConfigError, match="once"):
        load_surrogate(f"cifar-resnet20:{copy}", weights=resnet20.weights_path)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert torch.equal(s.features(x), resnet20.features(x))
    # Our own state dicts (normalisation prefix, any number of classes) load too.
    from verify.models import create_model

    net = create_model("resnet20", num_classes=7)
    torch.save(net.state_dict(), tmp_path / "ours.pth")
    ours = load_surrogate(f"cifar-resnet20:{tmp_path / 'ours.pth'}")
    assert torch.allclose(ours.features(x), net.eval().forward_features(x), atol=1e-6)
    with pytest.raises(WeightsError):
        load_surrogate(f"cifar-resnet32:{tmp_path / 'ours.pth'}")  # wrong depth


def test_missing_weights_fail_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(surrogates, "SHARED_WEIGHTS_DIR", tmp_path / "no-shared")
    monkeypatch.setattr(surrogates, "BUNDLED_WEIGHTS_DIR", tmp_path / "no-bundle")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    start = time.monotonic()
    with pytest.raises(WeightsError) as e:
        load_surrogate("cifar-resnet56")
    assert "cifar-resnet56:PATH" in _one_line(e) and "akamaster" in str(e.value)
    with pytest.raises(WeightsError, match="not found"):
        load_surrogate(f"cifar-resnet20:{tmp_path / 'nope.th'}")
    with pytest.raises(WeightsError) as e:
        load_surrogate("torchvision:resnet18")
    assert "torchvision:resnet18:PATH" in _one_line(e)
    with pytest.raises(ConfigError):
        load_surrogate("torchvision:no_such_net")
    assert time.monotonic() - start < 5


def test_loading_leaves_global_rng_alone(tmp_path):
    state = torch.get_rng_state()
    load_surrogate("cifar-resnet20")
    load_surrogate("random:cifar-resnet20", keyring=Keyring.from_seed(0))
    assert torch.equal(state, torch.get_rng_state())


# --------------------------------------------------------------------------------------------
# Keyed random surrogates


@pytest.mark.parametrize("arch", ["tiny", "cifar-resnet20"])
def test_random_is_keyed(arch):
    a = load_surrogate(f"random:{arch}", keyring=Keyring.from_seed(1))
    b = load_surrogate(f"random:{arch}", keyring=Keyring.from_seed(1))
    c = load_surrogate(f"random:{arch}", keyring=Keyring.from_seed(2))
    sd_a, sd_b, sd_c = (s.module.state_dict() for s in (a, b, c))
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)  # exact: CPU generator draws, no arithmetic
    assert not all(torch.equal(sd_a[k], sd_c[k]) for k in sd_a if sd_a[k].is_floating_point() and sd_a[k].dim() > 1)
    assert a.spec == f"random:{arch}" and a.weights_sha256 == "" and a.weights_path is None
    assert a.feature_dim == (128 if arch == "tiny" else 64)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.features(x), b.features(x))
    assert not torch.allclose(a.features(x), c.features(x))


def test_random_needs_a_keyring_and_no_weights(resnet20):
    with pytest.raises(ConfigError, match="keyring"):
        load_surrogate("random:tiny")
    with pytest.raises(ConfigError):
        load_surrogate("random:tiny", keyring=b"0123456789abcdef")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no weights"):
        load_surrogate("random:tiny", weights=resnet20.weights_path, keyring=Keyring.from_seed(0))


# --------------------------------------------------------------------------------------------
# torchvision


def test_torchvision_local_weights(tmp_path):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.shufflenet_v2_x0_5(num_classes=1000).eval()
    path = tmp_path / "shuffle.pth"
    torch.save(net.state_dict(), path)
    s = load_surrogate(f"torchvision:shufflenet_v2_x0_5:{path}")
    assert s.input_size == (224, 224) and s.feature_dim == 1024 and len(s.weights_sha256) == 64
    x = torch.rand(2, 3, 64, 64)
    big = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    net.fc = torch.nn.Identity()
    with torch.no_grad():
        assert torch.allclose(s.features(x), net((big - mean) / std), atol=1e-5)


# --------------------------------------------------------------------------------------------
# open_clip


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """No Hugging Face or open_clip URL cache, and the default (offline) mode."""
    import huggingface_hub.constants as hf_constants
    import open_clip  # noqa: F401  (imported here so the timed parts below do not pay for it)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return hf_constants


def test_clip_missing_tag_fails_fast_offline(empty_caches):
    start = time.monotonic()
    with pytest.raises(WeightsError) as e:
        load_surrogate("clip:RN50")  # default tag openai, not cached
    msg = _one_line(e)
    assert "clip:RN50/openai" in msg and "--surrogate-weights" in msg and "HF_HUB_OFFLINE" in msg
    assert time.monotonic() - start < 5
    # the offline switch is restored afterwards
    import os

    assert "HF_HUB_OFFLINE" not in os.environ and empty_caches.HF_HUB_OFFLINE is False
    with pytest.raises(ConfigError, match="openai, yfcc15m, cc12m"):
        load_surrogate("clip:RN50/no-such-tag")
    with pytest.raises(WeightsError, match="not found"):
        load_surrogate("clip:RN50/rn50.pt")  # a file name, not a tag
    with pytest.raises(ConfigError, match="open_clip.list_models"):
        load_surrogate("clip:NoSuchArch")
    with pytest.raises(WeightsError, match="no pretrained weights"):
        load_surrogate("clip:ViT-S-32-alt")  # an architecture without published weights
    assert time.monotonic() - start < 5


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_clip_foreign_files_give_one_line(tmp_path, empty_caches):
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    scripted.save(str(tmp_path / "scripted.pt"))
    with pytest.raises(WeightsError) as e:
        load_surrogate("clip:RN50", weights=tmp_path / "scripted.pt")
    assert "TorchScript" in _one_line(e)
    torch.save({"x": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(WeightsError) as e:
        load_surrogate(f"clip:RN50/{tmp_path / 'other.pt'}")
    assert "does not fit clip:RN50" in _one_line(e)


def test_clip_local_state_dict(tmp_path, empty_caches):
    """The smallest open_clip config (ViT-S-32-alt, 43 M parameters): save a randomly initialised
    model, load it through the spec, and compare with open_clip's own ``encode_image``."""
    import open_clip

    arch = "ViT-S-32-alt"
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None).eval()
    path = tmp_path / "clip.pt"
    torch.save(model.state_dict(), path)
    try:
        s = load_surrogate(f"clip:{arch}", weights=path)
        assert s.spec == f"clip:{arch}/{path}" and s.input_size == (224, 224) and s.feature_dim == 256
        assert not s.module.training and not any(p.requires_grad for p in s.module.parameters())
        assert len(s.weights_sha256) == 64
        x = torch.rand(2, 1, 100, 80, requires_grad=True)
        f = s.features(x)
        f.sum().backward()
        assert f.shape == (2, 256) and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        big = torch.nn.functional.interpolate(x.detach().expand(-1, 3, -1, -1), size=(224, 224), mode="bilinear",
                                              align_corners=False, antialias=True)
        mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
        with torch.no_grad():
            assert torch.allclose(f.detach(), model.encode_image((big - mean) / std), atol=1e-4)
        (tmp_path / "other.pt").write_bytes(b"x")
        with pytest.raises(ConfigError, match="once"):
            load_surrogate(f"clip:{arch}/{path}", weights=tmp_path / "other.pt")
    finally:
        path.unlink()  # 170 MB


class _Holder(torch.nn.Module):
    """Root of a TorchScript archive that only carries tensors, as OpenAI's original CLIP files do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_clip_openai_torchscript_archive(tmp_path, empty_caches):
    """OpenAI's .pt files are TorchScript archives in OpenAI's layout, trained with QuickGELU and
    stored in float16: an archive of a QuickGELU ViT-S-32-alt with float16-exact weights loads to the
    same features."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-S-32-alt", pretrained=None, force_quick_gelu=True).eval()
    holder = _Holder()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    for key, value in model.state_dict().items():
        *parents, leaf = key.split(".")
        m = holder
        for name in parents:
            if name not in m._modules:
                m.add_module(name, torch.nn.Module())
            m = m._modules[name]
        m.register_buffer(leaf, value.clone())
    path = tmp_path / "ViT-S-32-alt.pt"
    torch.jit.script(holder).save(str(path))
    try:
        s = load_surrogate("clip:ViT-S-32-alt", weights=path)
        x = torch.rand(2, 3, 224, 224)
        mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
        with torch.no_grad():
            assert torch.allclose(s.features(x), model.encode_image((x - mean) / std), atol=1e-4)
        with pytest.raises(WeightsError) as e:
            load_surrogate("clip:RN50", weights=path)
        assert "different CLIP model" in _one_line(e)
    finally:
        path.unlink()
