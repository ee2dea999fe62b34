"""Score-CAM and Ablation-CAM passes: equal to one full pass per channel, but cheaper."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from gradcam_cli.layout import Layout
from gradcam_cli.models import find_layer
from gradcam_cli.perturb import ablation_logits, inference_copy, score_logits


def brute_ablation(model: nn.Module, layer: nn.Module, image: torch.Tensor,
                   channels: int, batch: int = 64) -> torch.Tensor:
    """The definition: a full forward pass per channel, that channel zeroed by a hook (row k of
    a batch of copies has channel k zeroed; whole passes, nothing replayed)."""
    rows = []
    for start in range(0, channels, batch):
        ks = list(range(start, min(start + batch, channels)))

        def zero(_m: nn.Module, _i: object, out: torch.Tensor, ks: list[int] = ks) -> torch.Tensor:
            out = out.clone()
            out[range(len(ks)), ks] = 0
            return out
        handle = layer.register_forward_hook(zero)
        try:
            with torch.no_grad():
                rows.append(model(image.expand(len(ks), -1, -1, -1)))
        finally:
            handle.remove()
    return torch.cat(rows)


def small_resnet() -> nn.Module:
    """resnet18 with random weights, in eval mode."""
    return torchvision.models.resnet18(num_classes=10).eval()


def test_ablation_inside_a_residual_block_equals_one_pass_per_channel() -> None:
    # bn2's output is changed in place downstream (out += identity; relu_), so replaying it
    # must hand out copies; its values are also negative, unlike a post-ReLU layer.
    model, image = small_resnet(), torch.randn(1, 3, 64, 64)
    layer = find_layer(model, "layer3.1.bn2")
    expected = brute_ablation(model, layer, image, 256)
    table = ablation_logits(model, layer, image, Layout("nchw", (4, 4)), batch_size=48)
    assert torch.allclose(table, expected, atol=1e-5)


def test_ablation_runs_the_layers_before_the_target_once() -> None:
    model, image = small_resnet(), torch.randn(1, 3, 64, 64)
    calls = {"stem": 0, "head": 0}

    def count(name: str):
        def hook(*_: object) -> None:
            calls[name] += 1
        return hook
    model.layer3[1].conv2.register_forward_hook(count("stem"))  # deep inside the part before
    model.fc.register_forward_hook(count("head"))
    table = ablation_logits(model, model.layer4, image, Layout("nchw", (2, 2)), batch_size=64)
    assert table.shape == (512, 10)
    assert calls["stem"] == 1                 # computed once; layer3 replays its output
    assert calls["head"] == 1 + 1 + 512 // 64  # recording, the replay check, the batches


class BatchFromPrefix(nn.Module):
    """Reshapes after the target layer by the batch size seen before it: replay cannot work."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.target = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.stem(x))
        return self.fc(self.target(a).reshape(a.shape[0], -1))


def test_ablation_falls_back_to_full_passes_when_replay_fails() -> None:
    model, image = BatchFromPrefix().eval(), torch.randn(1, 3, 8, 8)
    expected = brute_ablation(model, model.target, image, 6)
    table = ablation_logits(model, model.target, image, Layout("nchw", (8, 8)), batch_size=4)
    assert torch.allclose(table, expected, atol=1e-6)


def test_score_logits_equal_masked_passes_and_share_constant_channels() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    with torch.no_grad():
        model[0].weight[2] = 0  # channel 2 is constant: bias only
    image = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        acts = model[1](model[0](image))
        expected = []
        for k in range(3):
            a = acts[0, k]
            mask = (a - a.min()) / (a.max() - a.min()) if a.max() > a.min() else torch.zeros_like(a)
            expected.append(model(image * mask)[0])
    passes = []
    fast = inference_copy(model)
    fast.register_forward_hook(lambda _m, i, _o: passes.append(len(i[0])))
    table = score_logits(fast, image, acts, Layout("nchw", (4, 4)), batch_size=2)
    assert torch.allclose(table, torch.stack(expected), atol=1e-6)
    assert passes == [1, 2]  # the constant channel's blank input once, then channels 0 and 1


def test_inference_copy_folds_batch_norm_and_leaves_the_model_alone() -> None:
    model, image = small_resnet(), torch.randn(2, 3, 64, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = inference_copy(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())  # folded away
    with torch.no_grad():
        assert torch.allclose(fast(image), model(image), atol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.conv1.weight.is_contiguous()  # the original keeps its memory format
