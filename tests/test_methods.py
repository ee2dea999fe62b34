"""Maps against the papers' definitions on a network small enough to compute by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcam_cli import explain
from gradcam_cli.layout import Layout
from gradcam_cli.methods import cam, eigencam_map, gradcam, upsample


class Tiny(nn.Module):
    """x (1x1x2x2) → 1x1 conv to 2 channels [w=1, w=-1] → ReLU-type → mean pool → linear."""

    def __init__(self, activation: str = "module") -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.relu = nn.ReLU6() if activation == "relu6" else nn.ReLU()
        self.activation = activation
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        r = {"module": self.relu, "relu6": self.relu, "F.relu": F.relu, "torch.relu": torch.relu,
             "Tensor.relu": lambda t: t.relu(), "inplace": lambda t: F.relu(t, inplace=True),
             "relu_": lambda t: t.relu_()}[self.activation](a)
        return self.fc(r.mean(dim=(2, 3)))


X = torch.tensor([[[[1.0, -2.0], [3.0, 0.0]]]])
# By hand, for class 1 (logits: class 0 = 1·1 + 2·0.5 = 2, class 1 = 3·1 - 1·0.5 = 2.5):
# A0 = x, A1 = -x; dL/dR0 = 3/4, dL/dR1 = -1/4 everywhere; masks A0>0 = [[1,0],[1,0]],
# A1>0 = [[0,1],[0,0]].
VANILLA = [[0.75, 0.25], [0.75, 0.0]]   # 0.75·mask0 - (-0.25)·mask1
GUIDED = [[0.75, 0.0], [0.75, 0.0]]     # the negative -0.25 through channel 1 is cut
DECONV = [[0.75, 0.75], [0.75, 0.75]]   # relu(0.75) everywhere on channel 0, relu(-0.25)=0
# Grad-CAM on conv: α0 = mean(0.75·mask0) = 0.375, α1 = mean(-0.25·mask1) = -0.0625;
# relu(0.375·x + 0.0625·x) = 0.4375·relu(x).
CAM_CONV = [[0.4375, 0.0], [1.3125, 0.0]]
# Grad-CAM on the activation: α = (0.75, -0.25); relu(0.75·R0 - 0.25·R1).
CAM_RELU = [[0.75, 0.0], [2.25, 0.0]]


@pytest.mark.parametrize("activation", ["module", "relu6", "F.relu", "torch.relu",
                                        "Tensor.relu", "inplace", "relu_"])
def test_tiny_network_maps_match_hand_computation(activation: str) -> None:
    result = explain(Tiny(activation), X, "conv", topk=1)
    assert result.classes.tolist() == [[1]]
    maps = {m: result.maps[m][0, 0, 0] for m in result.maps}
    assert torch.allclose(maps["vanilla"], torch.tensor(VANILLA))
    assert torch.allclose(maps["guided"], torch.tensor(GUIDED))
    assert torch.allclose(maps["deconv"], torch.tensor(DECONV))
    assert torch.allclose(maps["gradcam"], torch.tensor(CAM_CONV))
    assert torch.allclose(maps["guided-gradcam"], torch.tensor(GUIDED) * torch.tensor(CAM_CONV))


def test_gradcam_on_activation_layer_matches_hand_computation() -> None:
    result = explain(Tiny(), X, "relu", class_ids=[1], methods=["gradcam"])
    assert torch.allclose(result.maps["gradcam"][0, 0, 0], torch.tensor(CAM_RELU))


def test_relu6_upper_bound_blocks_gradient() -> None:
    """Above 6 a ReLU6 passes no gradient under the rules that keep the forward mask."""
    x = X * 10  # every positive pre-activation (10, 30 on channel 0; 20 on channel 1) exceeds 6
    for activation, blocked in (("relu6", True), ("module", False)):
        result = explain(Tiny(activation), x, "conv", class_ids=[1], methods=["vanilla", "guided"])
        for method in ("vanilla", "guided"):
            assert bool((result.maps[method] == 0).all()) is blocked


def test_gradcam_is_relu_of_weighted_sum_and_upsampled() -> None:
    acts = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[4.0, 3.0], [2.0, 1.0]]]])
    grads = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[-2.0, -2.0], [-2.0, -2.0]]]])
    # α = (1, -2): 1·A0 - 2·A1 = [[-7, -4], [-1, 2]] → relu → [[0, 0], [0, 2]]
    cam = gradcam(acts, grads, (2, 2), Layout("nchw", (2, 2)))
    assert cam[0, 0].tolist() == [[0.0, 0.0], [0.0, 2.0]]
    big = gradcam(acts, grads, (4, 4), Layout("nchw", (2, 2)))
    assert big.shape == (1, 1, 4, 4)
    assert torch.allclose(big, upsample(cam[:, 0], (4, 4)))
    assert big[0, 0, -1, -1] == 2.0 and big[0, 0, 0, 0] == 0.0


def test_gradcam_folds_tokens_and_channels_last_by_their_layout() -> None:
    grid = torch.rand(1, 5, 3, 4)
    grads = torch.rand(1, 5, 3, 4) - 0.3
    expected = gradcam(grid, grads, (6, 8), Layout("nchw", (3, 4)))
    assert expected.max() > 0
    # Two prefix tokens (e.g. class and distillation), then the 3x4 grid row by row.
    tokens = torch.cat([torch.rand(1, 2, 5), grid.flatten(2).transpose(1, 2)], dim=1)
    token_grads = torch.cat([torch.rand(1, 2, 5), grads.flatten(2).transpose(1, 2)], dim=1)
    assert torch.allclose(gradcam(tokens, token_grads, (6, 8), Layout("tokens", (3, 4), 2)), expected)
    nhwc = gradcam(grid.permute(0, 2, 3, 1), grads.permute(0, 2, 3, 1), (6, 8), Layout("nhwc", (3, 4)))
    assert torch.allclose(nhwc, expected)


# The CAM family on the tiny network, layer "conv", class 1: A0 = x, A1 = -x,
# G0 = 0.75·mask0 = [[0.75, 0], [0.75, 0]], G1 = -0.25·mask1 = [[0, -0.25], [0, 0]].
# Grad-CAM++: ΣA0 = 2, so α = G²/(2G² + 2G³) = 1/(2 + 2·0.75) = 2/7 where G0 ≠ 0;
#   w0 = 2 · (2/7) · 0.75 = 3/7; w1 = 0 (relu(G1) = 0) → (3/7)·relu(x).
# XGrad-CAM: w0 = (1·0.75 + 3·0.75)/2 = 1.5; w1 = (2·(-0.25))/(-2) = 0.25 → relu(1.25·x).
# Layer-CAM: relu(G0)·A0 + relu(G1)·A1 = [[0.75, 0], [2.25, 0]].
# HiResCAM: G0·A0 + G1·A1 = [[0.75, -0.5], [2.25, 0]] → relu.
# Score-CAM: masks (x+2)/5 and (3-x)/5; masked inputs [[.6, 0], [3, 0]] and [[.4, -2], [0, 0]]
#   give class-1 logits 3·0.9 - 0 = 2.7 and 3·0.1 - 0.5 = -0.2; w = softmax(2.7, -0.2).
# Ablation-CAM: logit 2.5; without A0: -0.5 → w0 = 3/2.5 = 1.2; without A1: 3 → w1 = -0.2;
#   relu(1.2·x + 0.2·x) = relu(1.4·x).
RELU_X = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
SCORE_W = torch.tensor([2.7, -0.2]).softmax(0)
FAMILY = {
    "gradcam++": 3 / 7 * RELU_X,
    "xgradcam": 1.25 * RELU_X,
    "layercam": torch.tensor([[0.75, 0.0], [2.25, 0.0]]),
    "hirescam": torch.tensor([[0.75, 0.0], [2.25, 0.0]]),
    "scorecam": float(SCORE_W[0] - SCORE_W[1]) * RELU_X,
    "ablationcam": 1.4 * RELU_X,
}


@pytest.mark.parametrize("method", sorted(FAMILY))
def test_cam_family_on_tiny_network_matches_hand_computation(method: str) -> None:
    result = explain(Tiny(), X, "conv", class_ids=[1], methods=[method], batch_size=1)
    assert torch.allclose(result.maps[method][0, 0, 0], FAMILY[method], atol=1e-6)


# Above, Layer-CAM and HiResCAM give the same map (no negative gradient meets a positive
# activation there). With the conv's second weight 0.5 instead of -1, layer "relu" holds
# R0 = relu(x) = [[1, 0], [3, 0]] and R1 = 0.5·relu(x); dL1/dR0 = 3/4 and dL1/dR1 = -1/4 everywhere:
# HiResCAM: 0.75·R0 - 0.25·R1 = 0.625·relu(x); Layer-CAM: relu(0.75)·R0 + relu(-0.25)·R1 = 0.75·relu(x).
@pytest.mark.parametrize(("method", "factor"), [("hirescam", 0.625), ("layercam", 0.75)])
def test_layercam_and_hirescam_differ_where_a_gradient_is_negative(method: str, factor: float) -> None:
    net = Tiny()
    with torch.no_grad():
        net.conv.weight[1] = 0.5
    result = explain(net, X, "relu", class_ids=[1], methods=[method])
    assert torch.allclose(result.maps[method][0, 0, 0], factor * RELU_X)


def test_eigencam_sign_follows_the_total_activation() -> None:
    # Positions x channels: three at (0, 0) and one at (4, 2); centred, the first principal
    # direction is ±(2, 1)/√5, and the last position projects to ±7.5/√5, the others ∓2.5/√5.
    acts = torch.zeros(1, 2, 2, 2)
    acts[0, :, 1, 1] = torch.tensor([4.0, 2.0])
    peak, rest = 7.5 / 5 ** 0.5, 2.5 / 5 ** 0.5
    assert torch.allclose(eigencam_map(acts)[0], torch.tensor([[-rest, -rest], [-rest, peak]]))
    # Negated activations: the total is now lowest at (1, 1), so the sign turns over too.
    assert torch.allclose(eigencam_map(-acts)[0], torch.tensor([[rest, rest], [rest, -peak]]))


def test_gradient_cams_agree_when_the_gradient_is_spatially_constant() -> None:
    """After global average pooling and a linear head, G^k is constant over positions, and
    Grad-CAM, XGrad-CAM and HiResCAM reduce to the same map (Draelos & Carin 2020)."""
    acts, grads = torch.rand(2, 4, 3, 3), torch.randn(2, 4, 1, 1).expand(2, 4, 3, 3)
    expected = cam("gradcam", acts, grads, (3, 3), Layout("nchw", (3, 3)))
    for method in ("xgradcam", "hirescam"):
        assert torch.allclose(cam(method, acts, grads, (3, 3), Layout("nchw", (3, 3))), expected, atol=1e-6)


def test_registry_keeps_the_method_list_defaults_and_titles() -> None:
    """One registry entry per method; the names, defaults and groups callers use are derived
    from it and equal the lists the tool has always had (written out here, not derived)."""
    from gradcam_cli import methods as M
    from gradcam_cli.render import TITLES
    assert M.METHODS == ("vanilla", "guided", "deconv", "integrated-gradients", "gradcam", "guided-gradcam",
                         "gradcam++", "xgradcam", "layercam", "hirescam", "eigengradcam", "eigencam",
                         "scorecam", "ablationcam", "fullgrad", "occlusion", "rise")
    assert M.DEFAULT_METHODS == ("vanilla", "guided", "deconv", "gradcam", "guided-gradcam")
    assert M.GRADIENT_METHODS == {"vanilla": "plain", "guided": "guided", "deconv": "deconv"}
    assert M.GRADIENT_CAMS == ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "eigengradcam")
    assert M.PERTURBATION_CAMS == ("scorecam", "ablationcam")
    assert M.CAM_METHODS == (*M.GRADIENT_CAMS, "eigencam", "scorecam", "ablationcam")
    assert [m.name for m in M.REGISTRY] == list(M.METHODS)
    assert all(M.DESCRIPTIONS[m] for m in M.METHODS)
    assert TITLES["gradcam++"] == "Grad-CAM++" and TITLES["input"] == "input crop"
    assert [m for m in M.METHODS if M.overlay(m)] == [*M.CAM_METHODS, "fullgrad", "occlusion", "rise"]
    assert [m for m in M.METHODS if not M.REGISTRY_BY_NAME[m].layered] == [
        "vanilla", "guided", "deconv", "integrated-gradients", "fullgrad", "occlusion", "rise"]
    assert M.title("occlusion-35") == "occlusion 35 px" and M.title("eigencam") == "Eigen-CAM"
    assert M.overlay("occlusion-35") and not M.overlay("guided-gradcam")
