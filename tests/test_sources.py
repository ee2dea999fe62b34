"""Model sources: timm, Hugging Face and the user's own factory; every token layout folded right.

Each Grad-CAM is checked against plain autograd on the layer output folded by hand (prefix
tokens dropped, the grid read from the model's patch size and input size, written out here).
No test downloads: timm models are built with random weights, Hugging Face ones from a small
config saved with ``save_pretrained`` into a temp folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch
import transformers
from PIL import Image
from timm.data import create_transform, resolve_model_data_config

from gradcam_cli import explain, load_model
from gradcam_cli.errors import ArgumentError
from gradcam_cli.models import LoadedModel, default_layer, spatial_layers, stage_layers

from .conftest import SAMPLES
from .references import Fold, hand_gradcam


def tokens(prefix: int, h: int, w: int) -> Fold:
    """NxTxC tokens: ``prefix`` leading tokens dropped, then an h x w grid row by row."""
    return lambda t: t[:, prefix:].reshape(len(t), h, w, t.shape[-1]).permute(0, 3, 1, 2)


def nchw(t: torch.Tensor) -> torch.Tensor:
    """A convolutional map is NxCxhxw already."""
    return t


def check_gradcam(model: LoadedModel, layer: str, fold: Fold) -> None:
    """The default layer is ``layer``, and Grad-CAM there equals the hand computation."""
    assert default_layer(model.arch, model.module, model.preprocess) == layer
    x = torch.randn(1, model.preprocess.channels, *model.preprocess.input_size)
    result = explain(model.module, x, layer, class_ids=[1], methods=["gradcam"])
    cam, direct = result.maps["gradcam"][0, 0, 0], hand_gradcam(model.module, x, layer, 1, fold)
    assert direct.max() > 0 and torch.allclose(cam, direct, rtol=0, atol=1e-5 * float(direct.max()))


@pytest.mark.parametrize(("name", "layer", "fold"), [
    ("resnet18", "layer4", nchw),
    ("convnext_tiny", "stages", nchw),  # as torchvision's "features"
    ("vit_small_patch16_224", "blocks.11.norm1", tokens(1, 14, 14)),
    ("deit_tiny_distilled_patch16_224", "blocks.11.norm1", tokens(2, 14, 14)),  # class + distillation
])
def test_timm_gradcam_equals_the_hand_fold(name: str, layer: str, fold: Fold) -> None:
    """Random weights at timm's 224 px (vit_small and convnext_tiny take ~10-15 s on 2 cores)."""
    model = load_model(f"timm/{name}", "none", num_classes=5)
    assert model.categories == [f"class {i}" for i in range(5)] and model.weights == "none"
    check_gradcam(model, layer, fold)


def test_timm_vit_stages_are_the_quarter_blocks_first_norms() -> None:
    model = load_model("timm/deit_tiny_distilled_patch16_224", "none", num_classes=5)
    assert stage_layers(model.arch, model.module, model.preprocess) == [
        f"blocks.{i}.norm1" for i in (2, 5, 8, 11)]


def test_timm_random_weights_repeat_and_keep_imagenet_names() -> None:
    a, b = load_model("timm/resnet18", "none"), load_model("timm/resnet18", "none")
    assert torch.equal(a.module.fc.weight, b.module.fc.weight)
    assert a.categories[0].startswith("tench") and len(a.categories) == 1000


@pytest.mark.parametrize("name", ["resnet18", "vit_small_patch16_224", "convnext_tiny"])
def test_timm_preprocessing_equals_timms_transform(name: str) -> None:
    """Pixel for pixel on a square, a wide and a tall image (floor(224 / crop_pct), bicubic)."""
    ours = load_model(f"timm/{name}", "none").preprocess
    theirs = create_transform(**resolve_model_data_config(timm.create_model(name, pretrained=False)))
    photo = Image.open(SAMPLES / "coffee.png").convert("RGB")
    for size in ((300, 300), (400, 260), (250, 333)):
        image = photo.resize(size)
        assert torch.allclose(ours.to_tensor(ours.model_pixels(image)), theirs(image), atol=1e-6), size


def test_timm_checkpoint_loads_with_its_digest(tmp_path: Path) -> None:
    path = tmp_path / "net.pth"
    source = timm.create_model("resnet18", pretrained=False, num_classes=3)
    torch.save(source.state_dict(), path)
    model = load_model("timm/resnet18", str(path), num_classes=3)
    assert torch.equal(model.module.fc.weight, source.fc.weight)
    assert model.weights == str(path) and len(model.weights_sha256) == 64
    with pytest.raises(ArgumentError, match=r"fc\.weight: checkpoint"):
        load_model("timm/resnet18", str(path))


def test_timm_offline_download_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*_a: object, **_k: object) -> None:
        raise LocalEntryNotFoundError("cannot reach the hub and the file is not in the cache")
    monkeypatch.setattr("timm.models._builder.load_pretrained", offline)
    with pytest.raises(ArgumentError) as info:
        load_model("timm/resnet18")
    problem = info.value.problem
    assert info.value.argument == "weights" and "checkpoint file" in problem and "'none'" in problem


def test_timm_unknown_name_and_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ArgumentError, match="timm/resnet18") as info:
        load_model("timm/resnet81", "none")
    assert info.value.argument == "arch"
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ArgumentError, match=r"needs timm: pip install 'gradcam\[timm\]'"):
        load_model("timm/resnet18", "none")


def write_factory(folder: Path, body: str) -> None:
    """A user module ``usernet.py`` in ``folder``, importable for this test only."""
    (folder / "usernet.py").write_text("import timm\nimport torch\n\n" + body)


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder on sys.path for the user's module, forgotten after the test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "usernet", raising=False)
    yield tmp_path
    sys.modules.pop("usernet", None)


IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def test_register_token_vit_from_a_user_factory(user_module: Path) -> None:
    """A class token and 4 register tokens before a 4x6 grid (64x96 input, 16 px patches; 4
    blocks, so the quarters are every block)."""
    write_factory(user_module, "def build(num_classes=1000):\n    return timm.create_model("
                  "'vit_small_patch16_224', pretrained=False, reg_tokens=4, img_size=(64, 96), "
                  "depth=4, num_classes=num_classes)\n")
    model = load_model("module:usernet:build", "none", num_classes=4,
                       preprocess={"input_size": (64, 96), **IMAGENET})
    assert model.categories == [f"class {i}" for i in range(4)]
    check_gradcam(model, "blocks.3.norm1", tokens(5, 4, 6))
    assert stage_layers(model.arch, model.module, model.preprocess) == [f"blocks.{i}.norm1" for i in range(4)]


def test_non_square_input_on_a_dynamic_size_vit(user_module: Path) -> None:
    """160x224 on a ViT that takes any size: a 10x14 grid after the class token."""
    write_factory(user_module, "def build():\n    return timm.create_model('vit_small_patch16_224', "
                  "pretrained=False, dynamic_img_size=True, depth=4, num_classes=3)\n")
    model = load_model("module:usernet:build", preprocess={"input_size": (160, 224), **IMAGENET})
    check_gradcam(model, "blocks.3.norm1", tokens(1, 10, 14))


def test_user_factory_with_a_checkpoint_and_its_sidecar(user_module: Path, tmp_path: Path) -> None:
    write_factory(user_module, "def build(num_classes=10):\n    return timm.create_model('resnet18', "
                  "pretrained=False, num_classes=num_classes)\n")
    path = tmp_path / "net.pt"
    source = timm.create_model("resnet18", pretrained=False, num_classes=2)
    torch.save({"state_dict": source.state_dict()}, path)
    (tmp_path / "net.preprocess.json").write_text('{"input_size": [96, 128], "mean": [0.5, 0.5, 0.5], '
                                                  '"std": [0.25, 0.25, 0.25]}')
    model = load_model("module:usernet:build", str(path), num_classes=2)
    assert torch.equal(model.module.fc.weight, source.fc.weight) and model.weights_sha256
    assert model.preprocess.input_size == (96, 128) and model.preprocess.std == (0.25,) * 3
    check_gradcam(model, "layer4", nchw)


@pytest.mark.parametrize(("spec", "problem"), [
    ("module:usernet", "give module:PACKAGE.MODULE:FACTORY"),
    ("module:nosuchmodule_xyz:build", "no module nosuchmodule_xyz"),
    ("module:usernet:missing", "usernet has no attribute missing"),
    ("module:usernet:fails", "the factory raised RuntimeError: no GPU here"),
    ("module:usernet:number", "returned a int, not a torch.nn.Module"),
    ("module:usernet:build", "has no default preprocessing"),
])
def test_user_factory_errors_are_one_line(user_module: Path, spec: str, problem: str) -> None:
    write_factory(user_module, "def build():\n    return torch.nn.Linear(2, 2)\n\n\n"
                  "def fails():\n    raise RuntimeError('no GPU here')\n\n\ndef number():\n    return 3\n")
    with pytest.raises(ArgumentError) as info:
        load_model(spec, "none")
    assert problem in info.value.problem and "\n" not in str(info.value)


def save_hf(folder: Path, kind: str) -> Path:
    """A tiny random Hugging Face ViT (32x32, 8 px patches, 3 labels) or ConvNeXt (64 px, 4
    labels) with its image processor, saved with save_pretrained."""
    torch.manual_seed(0)
    if kind == "vit":
        config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=32,
                                        id2label={0: "ant", 1: "bee", 2: "cat"})
        model = transformers.ViTForImageClassification(config)
        processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    else:
        config = transformers.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_labels=4)
        model = transformers.ConvNextForImageClassification(config)
        processor = transformers.ConvNextImageProcessor(size={"shortest_edge": 64})
    model.save_pretrained(folder / kind)
    processor.save_pretrained(folder / kind)
    return folder / kind


def test_hf_vit_from_a_saved_folder(tmp_path: Path) -> None:
    folder = save_hf(tmp_path, "vit")
    model = load_model(f"hf/{folder}")
    assert model.categories == ["ant", "bee", "cat"] and model.weights == "DEFAULT"
    saved = transformers.AutoModelForImageClassification.from_pretrained(folder)
    assert torch.equal(model.module.classifier.weight, saved.classifier.weight)
    check_gradcam(model, "vit.layers.1.layernorm_before", tokens(1, 4, 4))
    assert stage_layers(model.arch, model.module, model.preprocess) == [
        "vit.layers.0.layernorm_before", "vit.layers.1.layernorm_before"]


def test_hf_convnext_from_a_saved_folder(tmp_path: Path) -> None:
    model = load_model(f"hf/{save_hf(tmp_path, 'convnext')}", "none", num_classes=6)
    assert model.categories == [f"LABEL_{i}" for i in range(6)]
    check_gradcam(model, "convnext.encoder.stages.3", nchw)


@pytest.mark.parametrize("kind", ["vit", "convnext"])
def test_hf_preprocessing_equals_the_image_processor(tmp_path: Path, kind: str) -> None:
    """Pixel for pixel against the processor's PIL backend; its torchvision backend resizes
    tensors, not PIL images, so it agrees to a few grey levels."""
    folder = save_hf(tmp_path, kind)
    ours = load_model(f"hf/{folder}", "none").preprocess
    exact = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
    close = transformers.AutoImageProcessor.from_pretrained(folder)
    photo = Image.open(SAMPLES / "coffee.png").convert("RGB")
    for size in ((300, 300), (400, 260), (150, 211)):
        image = photo.resize(size)
        mine = ours.to_tensor(ours.model_pixels(image))
        theirs = torch.as_tensor(exact(image, return_tensors="pt")["pixel_values"][0])
        assert mine.shape == theirs.shape and torch.allclose(mine, theirs, atol=1e-5), size
        fast = close(image, return_tensors="pt")["pixel_values"][0]
        assert (mine - fast).abs().max() < 0.1, size


def test_hf_bad_folders_and_offline_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ArgumentError, match="holds no model saved by save_pretrained"):
        load_model(f"hf/{tmp_path}")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ArgumentError, match="not in the Hugging Face cache") as info:
        load_model("hf/nobody/no-such-model-xyz")
    assert info.value.argument == "arch"
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ArgumentError, match=r"pip install 'gradcam\[hf\]'"):
        load_model(f"hf/{tmp_path}")


def test_a_fixed_size_model_at_another_size_is_an_input_size_error(tmp_path: Path) -> None:
    with pytest.raises(ArgumentError) as info:  # refused when loading, before any image
        load_model(f"hf/{save_hf(tmp_path, 'vit')}", preprocess={"input_size": (48, 48)})
    assert (info.value.argument, info.value.value) == ("input_size", "48,48")
    assert "the model refuses a 3x48x48 input" in info.value.problem
    model = load_model(f"hf/{save_hf(tmp_path, 'vit')}")  # explain() on another size: the probe's error
    with pytest.raises(ArgumentError) as info:
        explain(model.module, torch.randn(1, 3, 48, 48), "vit.layers.1.layernorm_before")
    assert (info.value.argument, info.value.value) == ("input_size", "48,48")


def test_layers_command_for_each_source(tmp_path: Path, user_module: Path) -> None:
    """`gradcam layers` marks the token default and the stages for timm and Hugging Face ViTs,
    and takes a user factory's preprocessing from the flags (none, one line)."""
    from click.testing import CliRunner

    from gradcam_cli.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        result = CliRunner().invoke(main, ["layers", *args])
        return result.exit_code, result.stdout, result.stderr
    code, out, _ = run("--arch", "timm/deit_tiny_distilled_patch16_224")
    assert code == 0 and "*s blocks.11.norm1" in out and " s blocks.2.norm1" in out and "tokens" in out
    code, out, _ = run("--arch", f"hf/{save_hf(tmp_path, 'vit')}")
    assert code == 0 and "*s vit.layers.1.layernorm_before" in out
    write_factory(user_module, "def build():\n    return timm.create_model('resnet18', pretrained=False)\n")
    code, out, err = run("--arch", "module:usernet:build")
    assert code == 2 and "has no default preprocessing" in err and len(err.strip().splitlines()) == 1
    code, out, _ = run("--arch", "module:usernet:build", "--input-size", "96,128", "--mean", "0.5,0.5,0.5",
                       "--std", "0.5,0.5,0.5")
    assert code == 0 and "at 96x128" in out and "*s layer4" in out and "512x3x4" in out


def test_preprocessing_gradcam_cannot_reproduce_is_refused_until_given(tmp_path: Path) -> None:
    """timm's squash-then-crop (crop_pct 0.9) and a DeiT processor's squash to 40x40 then crop to
    32x32 have no Preprocess equal to them: refused in one line, unless the caller gives one."""
    given = {"input_size": (32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "resize": "squash"}
    name = "timm/tf_efficientnetv2_b3.in21k_ft_in1k"
    with pytest.raises(ArgumentError, match=r"crop_mode squash, crop_pct 0\.9") as info:
        load_model(name, "none")
    assert info.value.argument == "arch" and "input_size, mean and std" in info.value.problem
    assert load_model(name, "none", preprocess=given).preprocess.resize == "squash"
    folder = save_hf(tmp_path, "vit")
    transformers.DeiTImageProcessor(size={"height": 40, "width": 40},
                                    crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    with pytest.raises(ArgumentError, match="does not reproduce"):
        load_model(f"hf/{folder}")
    assert load_model(f"hf/{folder}", preprocess=given).preprocess.input_size == (32, 32)


def test_saved_weights_are_fingerprinted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hugging Face folder saved again with other weights is another model for --skip-existing;
    timm's DEFAULT weights are recorded with the pretrained tag they resolve to."""
    folder = save_hf(tmp_path, "vit")
    first = load_model(f"hf/{folder}").weights_sha256
    assert first and load_model(f"hf/{folder}").weights_sha256 == first
    torch.manual_seed(1)
    transformers.ViTForImageClassification(transformers.AutoConfig.from_pretrained(folder)).save_pretrained(folder)
    assert load_model(f"hf/{folder}").weights_sha256 not in (None, first)
    monkeypatch.setattr("timm.models._builder.load_pretrained", lambda *_a, **_k: None)  # "downloaded"
    assert load_model("timm/resnet18").weights == "DEFAULT (resnet18.a1_in1k)"


@pytest.mark.parametrize(("name", "shape", "fold"), [
    ("convnext_tiny", (1, 4, 3, 768), lambda t: t.permute(0, 3, 1, 2)),  # LayerNorm between permutes
    ("convnext_atto", (1, 320, 4, 3), nchw),                             # LayerNorm2d (conv_mlp)
])
def test_timm_convnext_block_norms_layout_comes_from_the_module(name: str, shape: tuple, fold: Fold) -> None:
    """The same layer of two timm ConvNeXts is channels-last in one and NCHW in the other: the
    probe tells them apart from the module at a 128x96 input, and Grad-CAM folds each right."""
    model = load_model(f"timm/{name}", "none", num_classes=3, preprocess={"input_size": (128, 96)})
    assert dict(spatial_layers(model.module, model.preprocess))["stages.3.blocks.1.norm"] == shape
    x, layer = torch.randn(1, 3, 128, 96), "stages.3.blocks.1.norm"
    cam = explain(model.module, x, layer, class_ids=[1], methods=["gradcam"]).maps["gradcam"][0, 0, 0]
    direct = hand_gradcam(model.module, x, layer, 1, fold)
    assert direct.max() > 0 and torch.allclose(cam, direct, rtol=0, atol=1e-5 * float(direct.max()))
