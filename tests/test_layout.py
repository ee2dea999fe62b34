"""Layer layouts on non-square inputs: decided by probes, never guessed from a square grid.

Each case folds the layer's output by hand (the permute or reshape written out here) and
checks gradcam's fold and its Grad-CAM map against that and plain autograd.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import get_model

from gradcam_cli import explain
from gradcam_cli.errors import ArgumentError
from gradcam_cli.layout import Layout, probe, to_nchw

from .references import Fold, hand_gradcam, output_and_gradient


def check(model: nn.Module, x: torch.Tensor, layer: str, expected: Layout, fold: Fold) -> None:
    """The probe finds ``expected``; gradcam's fold and Grad-CAM equal the hand fold's."""
    layout = probe(model, x)[layer][1]
    assert layout == expected
    acts, _ = output_and_gradient(model, x, layer, 0)
    assert torch.equal(to_nchw(acts, layout), fold(acts))
    result = explain(model, x, layer, class_ids=[1], methods=["gradcam"])
    cam = result.maps["gradcam"][0, 0, 0]
    assert cam.max() > 0 and torch.allclose(cam, hand_gradcam(model, x, layer, 1, fold), atol=1e-6)


def nchw(t: torch.Tensor) -> torch.Tensor:
    """A convolutional map is already NxCxhxw."""
    return t


def nhwc(t: torch.Tensor) -> torch.Tensor:
    """Swin's NxhxwxC map, channels moved to the front."""
    return t.permute(0, 3, 1, 2)


def test_resnet_on_a_non_square_input() -> None:
    model, x = get_model("resnet18", num_classes=5), torch.randn(1, 3, 64, 96)
    check(model, x, "layer3", Layout("nchw", (4, 6)), nchw)
    check(model, x, "layer4", Layout("nchw", (2, 3)), nchw)


def test_swin_on_a_non_square_input() -> None:
    """224x288 makes Swin's last grid 7x9; features.3 is 28x36 (NHWC throughout)."""
    model, x = get_model("swin_t", num_classes=5), torch.randn(1, 3, 224, 288)
    check(model, x, "features", Layout("nhwc", (7, 9)), nhwc)
    check(model, x, "features.3", Layout("nhwc", (28, 36)), nhwc)


def test_an_8x12_map_with_8_channels_is_not_permuted() -> None:
    """The old square-grid guess took (1, 8, 8, 12) for channels-last, since 8 == 8 != 12."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(32, 4))
    check(model, torch.randn(1, 3, 8, 12), "0", Layout("nchw", (8, 12)), nchw)


def test_vit_b_16_tokens_lose_the_class_token() -> None:
    model, x = get_model("vit_b_16", num_classes=5), torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        model.heads.head.weight.normal_()  # torchvision starts it at zero: every gradient 0

    def fold(t: torch.Tensor) -> torch.Tensor:
        return t[:, 1:].reshape(1, 14, 14, 768).permute(0, 3, 1, 2)
    check(model, x, "encoder.layers.encoder_layer_11.ln_1", Layout("tokens", (14, 14), 1), fold)


class TinyViT(nn.Module):
    """A ViT in miniature on a 16x24 input: 4x4 patches (a 4x6 grid), a class token and two
    register tokens before the patch tokens, one attention block, a head on the class token.
    ``fixed``: refuse any other input size, as torchvision's ViT does."""

    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.fixed = fixed
        self.patches = nn.Conv2d(3, 8, 4, stride=4)
        self.prefix = nn.Parameter(torch.randn(1, 3, 8))
        self.ln_1 = nn.LayerNorm(8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed and tuple(x.shape[-2:]) != (16, 24):
            raise ValueError("this model takes 16x24 inputs only")
        tokens = self.patches(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.prefix.expand(len(x), -1, -1), tokens], dim=1)
        y = self.ln_1(tokens)
        tokens = tokens + self.attention(y, y, y, need_weights=False)[0]
        return self.head(tokens[:, 0])


@pytest.mark.parametrize("fixed", [False, True], ids=["any-size", "fixed-size"])
def test_tokens_with_prefix_tokens_on_a_non_square_grid(fixed: bool) -> None:
    def fold(t: torch.Tensor) -> torch.Tensor:
        return t[:, 3:].reshape(1, 4, 6, 8).permute(0, 3, 1, 2)
    check(TinyViT(fixed), torch.randn(1, 3, 16, 24), "ln_1", Layout("tokens", (4, 6), 3), fold)


def test_outputs_without_a_grid_have_no_layout() -> None:
    model, x = get_model("resnet18", num_classes=5), torch.randn(1, 3, 64, 96)
    probed = probe(model, x)
    assert probed["fc"] == ((1, 5), None)
    assert probed["avgpool"] == ((1, 512, 1, 1), None)  # adaptive: 1x1 whatever the input


def test_a_1x1_grid_is_refused_not_drawn_uniform() -> None:
    """resnet18's layer4 on a 32x32 input has a 1x1 grid: every map would be one colour."""
    with pytest.raises(ArgumentError, match="has a 1x1 grid at this input size") as info:
        explain(get_model("resnet18", num_classes=5), torch.randn(1, 3, 32, 32), "layer4")
    assert (info.value.argument, info.value.value) == ("layer", "layer4")


def test_a_layout_that_does_not_fit_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        to_nchw(torch.zeros(1, 8, 8, 12), Layout("nhwc", (8, 12)))


def test_attention_heads_are_no_channels_last_grid() -> None:
    """timm's attention keeps q and k as N x heads x T x d: only axis 2 follows the width, as in
    a channels-last map, but it follows the height too, so it is no grid (it was taken for a
    6 x 25 NHWC map); the tokens around it keep their 4x6 grid after the class token."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_small_patch16_224", pretrained=False, dynamic_img_size=True, depth=2)
    probed = probe(model, torch.zeros(1, 3, 64, 96))
    assert probed["blocks.1.attn.k_norm"] == ((1, 6, 25, 64), None)
    assert probed["blocks.1.norm1"][1] == Layout("tokens", (4, 6), 1)
    with pytest.raises(ArgumentError, match="no spatial grid"):
        explain(model, torch.randn(1, 3, 64, 96), "blocks.1.attn.k_norm")
