"""Model loading: names, weights, checkpoints, labels, preprocessing and layers."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torchvision.models import get_model, get_model_weights

from gradcam_cli import ARCHITECTURES, UsageError, load_model
from gradcam_cli.errors import ArgumentError
from gradcam_cli.models import default_layer, find_layer, load_embedder, spatial_layers, stage_layers
from gradcam_cli.pipeline import resolve_layer, resolve_layers
from gradcam_cli.preprocess import Preprocess

from .conftest import SAMPLES

AT_224 = Preprocess((224, 224), (0.5,) * 3, (0.5,) * 3)  # what the layer probes need: size, channels


def test_every_torchvision_classifier_is_offered() -> None:
    assert set(ARCHITECTURES) == set(torchvision.models.list_models(module=torchvision.models))
    assert len(ARCHITECTURES) >= 80


def test_unknown_arch_suggests_closest() -> None:
    with pytest.raises(UsageError, match="did you mean resnet152"):
        load_model("resnet125", "none")


def test_unknown_weights_name_lists_choices() -> None:
    with pytest.raises(UsageError, match="IMAGENET1K_V1"):
        load_model("resnet18", "IMAGENET_V9")


def test_none_weights_keep_imagenet_names_and_preprocessing() -> None:
    model = load_model("resnet50", "none")
    meta = get_model_weights("resnet50").DEFAULT
    assert model.categories == list(meta.meta["categories"])
    assert (model.preprocess.resize_to, model.preprocess.input_size) == (232, (224, 224))
    assert model.weights == "none" and not model.module.training


def test_preprocessing_equals_torchvision_transforms() -> None:
    image = Image.open(SAMPLES / "coffee.png").convert("RGB")
    for arch in ("resnet18", "efficientnet_b0", "inception_v3"):
        ours = load_model(arch, "none").preprocess
        expected = get_model_weights(arch).DEFAULT.transforms()(image)
        assert torch.allclose(ours.to_tensor(ours.model_pixels(image)), expected, atol=1e-6)


def test_download_failure_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*_a: object, **_k: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(UsageError) as info:
        load_model("resnet18")
    message = str(info.value)
    assert info.value.argument == "weights" and "--" not in message
    assert "checkpoint file" in message and "TORCH_HOME" in message and "'none'" in message


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model", "dataparallel", "safetensors"])
def test_checkpoints_load(tmp_path: Path, layout: str) -> None:
    source = get_model("resnet18", weights=None, num_classes=5)
    state = source.state_dict()
    if layout == "safetensors":
        path = tmp_path / "m.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "m.pt"
        wrapped = {"plain": state, "state_dict": {"state_dict": state, "epoch": 3},
                   "model": {"model": state},
                   "dataparallel": {f"module.{k}": v for k, v in state.items()}}[layout]
        torch.save(wrapped, path)
    model = load_model("resnet18", str(path), num_classes=5)
    assert model.categories == [f"class {i}" for i in range(5)]
    assert torch.equal(model.module.fc.weight, source.fc.weight)


def test_checkpoint_with_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    # {"state_dict": builtins.print("this ran")} as pickle bytes: pickling `print` itself would
    # name whatever replaced it in this process (Ray's driver puts its safe_print there)
    path.write_bytes(b"(dS'state_dict'\ncbuiltins\nprint\n(S'this ran'\ntRs.")
    with pytest.raises(ArgumentError, match=r"could run code \(builtins\.print\).*unsafe_load"):
        load_model("resnet18", str(path))


def test_mismatched_checkpoint_lists_keys_and_shapes(tmp_path: Path) -> None:
    path = tmp_path / "ten.pth"
    torch.save(get_model("resnet18", weights=None, num_classes=10).state_dict(), path)
    with pytest.raises(UsageError, match=r"fc.weight: checkpoint \(10, 512\) vs model \(1000, 512\)"):
        load_model("resnet18", str(path))


def test_labels_file(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(get_model("resnet18", weights=None, num_classes=3).state_dict(), path)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n\nbird\n")
    assert load_model("resnet18", str(path), 3, labels).categories == ["cat", "dog", "bird"]
    labels.write_text("cat\ndog\n")
    with pytest.raises(UsageError, match="2 names for a head of 3"):
        load_model("resnet18", str(path), 3, labels)


@pytest.mark.parametrize("arch,expected", [
    ("resnet18", "layer4"), ("vgg11", "features"), ("alexnet", "features"),
    ("densenet121", "features"), ("inception_v3", "Mixed_7c"), ("googlenet", "inception5b"),
    ("squeezenet1_0", "features"), ("mobilenet_v3_small", "features"),
    ("efficientnet_b0", "features"), ("shufflenet_v2_x0_5", "conv5"), ("mnasnet0_5", "layers"),
    ("regnet_x_400mf", "trunk_output"), ("convnext_tiny", "features"), ("swin_t", "norm"),
    ("maxvit_t", "blocks.3"), ("vit_b_16", "encoder.layers.encoder_layer_11.ln_1"),
])
def test_default_layer_is_last_spatial_block(arch: str, expected: str) -> None:
    model = load_model(arch, "none")
    assert default_layer(arch, model.module, model.preprocess) == expected


def test_spatial_layers_have_shapes_and_skip_pooling() -> None:
    model = get_model("resnet18", weights=None)
    layers = dict(spatial_layers(model, AT_224))
    assert layers["layer4"] == (1, 512, 7, 7) and layers["layer1"] == (1, 64, 56, 56)
    assert "maxpool" not in layers and "avgpool" not in layers and "fc" not in layers


def test_find_layer_refuses_unknown_with_matches() -> None:
    model = get_model("vgg11", weights=None)
    assert find_layer(model, "features.18") is model.features[18]
    with pytest.raises(UsageError, match=r"features\.18"):
        find_layer(model, "feature.18")


def test_swin_default_layer_gives_hirescam_more_than_rounding_noise() -> None:
    """Swin's ``features`` reaches the score only through a LayerNorm at each position, which
    ignores any scaling of its input: so Σ_k G·A = 0 at every position there, and HiResCAM is
    float32 rounding noise (|Σ_k G·A| / Σ_k |G·A| ~ 2e-6). At the default layer it is not."""
    model = load_model("swin_t", "none").module
    x = torch.randn(1, 3, 224, 224)

    def cancellation(layer: str) -> float:
        kept = {}
        handle = find_layer(model, layer).register_forward_hook(lambda _m, _i, out: kept.update(a=out))
        logits = model(x)
        handle.remove()
        (grad,) = torch.autograd.grad(logits[0, logits.argmax()], kept["a"])
        product = (grad * kept["a"]).detach()  # NxHxWxC: channels last
        return float((product.sum(-1).abs() / product.abs().sum(-1)).median())
    assert cancellation("features") < 1e-4
    assert cancellation(default_layer("swin_t", model, AT_224)) > 1e-2


@pytest.mark.parametrize(("layer", "problem"), [
    ("", "empty"), ("fc", "of shape (1, 1000), has no spatial grid"),
    ("avgpool", "of shape (1, 512, 1, 1), has no spatial grid")])
def test_resolve_layer_refuses_a_layer_without_a_grid(layer: str, problem: str) -> None:
    model = load_model("resnet18", "none")
    with pytest.raises(ArgumentError) as info:
        resolve_layer(model, layer)
    assert (info.value.argument, info.value.value) == ("layer", layer)
    assert problem in info.value.problem and "`gradcam layers`" in info.value.problem


def test_resolve_layers_names_the_layer_without_a_grid() -> None:
    model = load_model("resnet18", "none")
    assert resolve_layers(model, ["layer3", "layer4"]) == ["layer3", "layer4"]
    with pytest.raises(ArgumentError, match="no spatial grid") as info:
        resolve_layers(model, ["layer4", "fc"])
    assert (info.value.argument, info.value.value) == ("layers", "fc")


def test_zero_initialised_heads_are_drawn_at_random() -> None:
    """torchvision starts ViT's head at zero: every logit equal, every map blank."""
    assert not get_model("vit_b_32", weights=None).heads.head.weight.any()
    model = load_model("vit_b_32", "none").module
    assert model.heads.head.weight.any()
    assert torch.equal(model.heads.head.weight, load_model("vit_b_32", "none").module.heads.head.weight)


@pytest.mark.parametrize(("arch", "expected"), [
    ("resnet50", ["layer1", "layer2", "layer3", "layer4"]),  # the stages named in the papers
    ("swin_t", ["features.1", "features.3", "features.5", "features.7"]),
    ("densenet121", [f"features.denseblock{i}" for i in range(1, 5)]),
    ("vgg11", ["features.1", "features.4", "features.9", "features.14", "features.19"]),
    ("vit_b_16", [f"encoder.layers.encoder_layer_{i}.ln_1" for i in (2, 5, 8, 11)]),
])
def test_stage_layers_end_each_grid_size(arch: str, expected: list[str]) -> None:
    module = get_model(arch).eval()
    stages = stage_layers(arch, module, AT_224)
    assert stages == expected
    if not arch.startswith("vit_"):  # each stage halves the grid of the one before
        shapes = dict(spatial_layers(module, AT_224))
        sides = [shapes[name][1 if arch.startswith("swin") else 2] for name in stages]  # Swin: NHWC
        assert all(sides[i] == 2 * sides[i + 1] for i in range(len(sides) - 1))


class _NoWeights(torch.nn.Module):
    """Stands for a downloaded network: the test needs only the weights' metadata."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(1, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Any input size: loading probes the model once with the preprocessing's input."""
        return self.head(x.mean(dim=(1, 2, 3))[:, None])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_weights_enum_is_preprocessed_by_its_own_transforms(
        arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gradcam_cli.sources.torchvision.download", lambda *_a: _NoWeights())
    image = Image.open(SAMPLES / "coffee.png").convert("RGB").resize((150, 110))
    for weights in get_model_weights(arch):
        ours = load_model(arch, weights.name).preprocess
        expected = weights.transforms()(image)
        assert torch.allclose(ours.to_tensor(ours.model_pixels(image)), expected, atol=1e-6), weights


def test_enum_weights_build_the_network_they_were_trained_as(monkeypatch: pytest.MonkeyPatch) -> None:
    """resnet50's V1 weights resize to 256 (DEFAULT, V2, to 232); vit_b_16's SWAG weights run
    at 384 px, bicubic."""
    def random_state(self: torchvision.models.WeightsEnum, *_a: object, **_k: object) -> dict:
        arch = {"ResNet50_Weights": "resnet50", "ViT_B_16_Weights": "vit_b_16"}[type(self).__name__]
        return get_model(arch, image_size=self.meta["min_size"][0]).state_dict() \
            if arch.startswith("vit") else get_model(arch).state_dict()
    monkeypatch.setattr("torchvision.models._api.WeightsEnum.get_state_dict", random_state)
    v1 = load_model("resnet50", "IMAGENET1K_V1")
    assert (v1.preprocess.resize_to, v1.preprocess.input_size) == (256, (224, 224))
    assert v1.weights == "IMAGENET1K_V1"
    swag = load_model("vit_b_16", "IMAGENET1K_SWAG_E2E_V1")
    assert (swag.preprocess.resize_to, swag.preprocess.input_size) == (384, (384, 384))
    assert swag.preprocess.interpolation == "bicubic"
    assert swag.module.image_size == 384


def _random_bytes(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 8)


@pytest.mark.parametrize("name,write,reason", [
    ("empty.safetensors", lambda p: p.write_bytes(b""), "(the file is empty)"),
    ("noise.safetensors", _random_bytes, "not a readable safetensors file"),
    ("noise.pt", _random_bytes, "not a readable checkpoint"),
    ("empty.pt", lambda p: p.write_bytes(b""), "not a readable checkpoint (the file is empty)"),
    ("text.pth", lambda p: p.write_text("weights: [1, 2, 3]\n"), "not a readable checkpoint"),
    ("values.pt", lambda p: torch.save({"fc.weight": [1.0, 2.0], "epoch": 3}, p),
     "holds fc.weight: list, not a tensor"),
])
def test_bad_checkpoints_are_one_clear_error(tmp_path: Path, name: str, write: object,
                                             reason: str) -> None:
    path = tmp_path / name
    write(path)
    with pytest.raises(ArgumentError) as info:
        load_model("resnet18", str(path))
    assert info.value.argument == "weights" and reason in info.value.problem, info.value
    assert "code" not in info.value.problem  # only pickles with code are called that


def test_embedder_checkpoint_brings_its_own_preprocessing(tmp_path: Path) -> None:
    net = load_embedder("resnet18", "none", embedding_dim=8)
    checkpoint = tmp_path / "metric.pt"
    torch.save(net.module.state_dict(), checkpoint)
    (tmp_path / "metric.preprocess.json").write_text(json.dumps(
        {"input_size": [64, 96], "mean": [0.2, 0.2, 0.2], "std": [0.1, 0.1, 0.1], "resize": "squash"}))
    model = load_embedder("resnet18", str(checkpoint), embedding_dim=8)
    assert model.preprocess.input_size == (64, 96) and model.preprocess.mean == (0.2, 0.2, 0.2)
    flagged = load_embedder("resnet18", str(checkpoint), embedding_dim=8, preprocess={"std": [0.3] * 3})
    assert flagged.preprocess.std == (0.3, 0.3, 0.3) and flagged.preprocess.input_size == (64, 96)


def test_load_model_refuses_an_input_the_model_cannot_take() -> None:
    with pytest.raises(ArgumentError, match=r"^input_size='160,224': the model refuses"):
        load_model("vit_b_16", "none", preprocess={"input_size": (160, 224)})
