"""Occlusion sensitivity against captum's ``Occlusion`` and seed 001's (grad-cam-pytorch) own
definition, on small random networks; its options, batches, records and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from captum.attr import Occlusion
from torch import nn

from gradcam_cli import perturb as P
from gradcam_cli.errors import ArgumentError
from gradcam_cli.explanation import explain
from gradcam_cli.metrics import baseline_of
from gradcam_cli.occlusion import OcclusionSettings, window_drops
from gradcam_cli.rise import RiseSettings
from gradcam_cli.settings import MethodSettings
from gradcam_cli.targets import top_classes, top_proxies

from .conftest import copy_batch_sizes, make_image
from .test_cli import compare_layers_error, evaluate_with_a_box, on_one_image, run


def occluding(**fields: object) -> MethodSettings:
    """The methods' settings with these occlusion settings."""
    return MethodSettings(occlusion=OcclusionSettings(**fields))


def small_net(outputs: int = 5) -> nn.Module:
    """A random conv net with batch norm (folded in the fast copy), global pooling and a head."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, outputs))
    with torch.no_grad():  # a batch norm that is not the identity
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


X = torch.randn(2, 3, 20, 17, generator=torch.Generator().manual_seed(1))


def captum_map(forward: nn.Module, x: torch.Tensor, patch: int, stride: int, fill: str,
               target: int) -> torch.Tensor:
    """captum's Occlusion of one image with the same window, stride and baseline, one channel."""
    baselines = baseline_of(x[0], fill)[None]
    attribution = Occlusion(forward).attribute(x, sliding_window_shapes=(3, patch, patch),
                                               strides=(3, stride, stride), baselines=baselines,
                                               target=target, perturbations_per_eval=64)
    return attribution[0, :1]


@pytest.mark.parametrize(("patch", "stride", "fill"), [(5, 2, "zero"), (6, 4, "mean"), (7, 7, "blur"),
                                                       (4, 3, "zero")])
def test_occlusion_equals_captum(patch: int, stride: int, fill: str) -> None:
    """Every image and explained class equals captum's, also where the last window is cut by
    the image's edge (20 - 7 is no multiple of 7)."""
    net = small_net()
    result = explain(net, X, "2", topk=2, methods=["occlusion"],
                     settings=occluding(patches=(patch,), stride=stride, fill=fill))
    assert result.maps["occlusion"].shape == (2, 2, 1, 20, 17)
    for n in range(2):
        for k, c in enumerate(result.classes[n].tolist()):
            expected = captum_map(net, X[n:n + 1], patch, stride, fill, c)
            assert torch.allclose(result.maps["occlusion"][n, k], expected, atol=1e-5), (n, k)


def test_padded_border_equals_captum_on_the_padded_input() -> None:
    """border="pad": the image surrounded by patch//2 of fill, windows over all of it, the map
    cropped back: captum's Occlusion of that padded input, cropped."""
    net, patch, stride = small_net(), 5, 2
    result = explain(net, X[:1], "2", class_ids=[3], methods=["occlusion"],
                     settings=occluding(patches=(patch,), stride=stride, border="pad"))
    padded = F.pad(X[:1], (2, 2, 2, 2))
    expected = captum_map(net, padded, patch, stride, "zero", 3)[:, 2:-2, 2:-2]
    assert torch.allclose(result.maps["occlusion"][0, 0], expected, atol=1e-5)


def seed_001_map(net: nn.Module, x: torch.Tensor, class_id: int, patch: int, stride: int) -> torch.Tensor:
    """Seed 001's occlusion sensitivity, by its definition (grad-cam-pytorch's
    ``occlusion_sensitivity``, read, not copied): the input padded by patch//2 of its fill value
    (0) on each side; rows start at 0, columns at one stride (its loop steps before recording);
    each window's occluded logit minus the padded input's logit, one value per window."""
    half = patch // 2
    padded = F.pad(x, (half, half, half, half), value=0.0)
    height, width = padded.shape[-2:]
    rows = range(0, height - patch + 1, stride)
    cols = [stride * (j + 1) for j in range(len(range(0, width - patch + 1, stride)))]
    with torch.no_grad():
        base = net(padded)[0, class_id]
        values = []
        for r in rows:
            for c in cols:
                occluded = padded.clone()
                occluded[..., r:r + patch, c:c + patch] = 0.0
                values.append(net(occluded)[0, class_id] - base)
    return torch.stack(values).view(len(rows), len(cols))


@pytest.mark.parametrize("patch", [3, 4, 5])
def test_seed_001_map_for_its_demo_settings(patch: int) -> None:
    """Seed 001's demo (stride 1, zero fill, padding by half a patch) on a small model: its
    value at each window is minus gradcam's drop for the same window; its columns are one
    window to the right (its off-by-one), and its last column's window hangs past the padded
    edge, which gradcam does not have."""
    net, x = small_net(), X[:1, :, :9, :8]
    settings = OcclusionSettings(patches=(patch,), stride=1, border="pad")
    fast = P.shared_graph(net, x)
    target = top_classes(class_ids=[2])(net(x).detach())
    drops = window_drops(fast, x, target, 0, patch, settings, batch_size=16)[0]  # K x rows x cols
    seed = seed_001_map(net, x, 2, patch, stride=1)
    assert seed.shape == drops.shape == (9 + 2 * (patch // 2) - patch + 1, 8 + 2 * (patch // 2) - patch + 1)
    assert torch.allclose(seed[:, :-1], -drops[:, 1:], atol=1e-5)


def test_several_patch_sizes_give_a_map_each_equal_to_their_own_run() -> None:
    net = small_net()
    both = explain(net, X, "2", topk=1, methods=["gradcam", "occlusion"],
                   settings=occluding(patches=(4, 6), stride=2))
    assert list(both.maps) == ["gradcam", "occlusion-4", "occlusion-6"]
    for patch in (4, 6):
        alone = explain(net, X, "2", topk=1, methods=["occlusion"],
                        settings=occluding(patches=(patch,), stride=2))
        assert torch.equal(both.maps[f"occlusion-{patch}"], alone.maps["occlusion"])


def test_negative_side_and_similarity_scores_are_occluded_too() -> None:
    """The explained score is the target's: -z gives minus the map; an embedding's dot product
    with a proxy equals captum's occlusion of that product."""
    net, settings = small_net(), OcclusionSettings(patches=(5,), stride=3)
    from gradcam_cli.targets import Scoring
    plus = explain(net, X[:1], "2", methods=["occlusion"], settings=MethodSettings(occlusion=settings),
                   target=top_classes(class_ids=[1]))
    minus = explain(net, X[:1], "2", methods=["occlusion"], settings=MethodSettings(occlusion=settings),
                    target=top_classes(class_ids=[1], scoring=Scoring("softmax", negative=True)))
    assert torch.allclose(minus.maps["occlusion"], -plus.maps["occlusion"], atol=1e-6)
    proxies = torch.randn(3, 5)
    result = explain(net, X[:1], "2", methods=["occlusion"], settings=MethodSettings(occlusion=settings),
                     target=top_proxies(proxies, "dot", topk=1))
    chosen = int(result.classes[0, 0])

    class Similarity(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return net(x) @ proxies.T
    expected = captum_map(Similarity(), X[:1], 5, 3, "zero", chosen)
    assert torch.allclose(result.maps["occlusion"][0, 0], expected, atol=1e-5)


def test_masked_copies_run_in_batches_on_the_shared_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """3 x 3 windows with batch size 4: the unoccluded input, then 4, 4 and 1 copies."""
    sizes = copy_batch_sizes(monkeypatch, P, "shared_graph")
    explain(small_net(), X[:1, :, :12, :12], "2", topk=1, methods=["occlusion"], batch_size=4,
            settings=occluding(patches=(6,), stride=3))
    assert sizes == [1, 4, 4, 1]


def passes_of(monkeypatch: pytest.MonkeyPatch) -> list[nn.Module]:
    """Collect the module that occlusion's passes run on, once per ``explain``."""
    import gradcam_cli.explanation as E
    seen, maps = [], E.occlusion_maps

    def spying(fast: nn.Module, *args: object) -> dict:
        seen.append(fast)
        return maps(fast, *args)
    monkeypatch.setattr(E, "occlusion_maps", spying)
    return seen


def test_passes_share_the_models_weights_instead_of_copying_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of the weights would add the model's size to the peak (100 MB for resnet50, about
    captum's whole peak at the same batch): the passes run on the model's own graph, its tensors shared."""
    net, seen = small_net(), passes_of(monkeypatch)
    explain(net, X[:1], "2", topk=1, methods=["occlusion"], settings=occluding(patches=(6,), stride=3))
    own = {t.data_ptr() for t in [*net.parameters(), *net.buffers()]}
    assert len(seen) == 1 and isinstance(seen[0], torch.fx.GraphModule)
    assert {t.data_ptr() for t in [*seen[0].parameters(), *seen[0].buffers()]} <= own


def test_the_forward_pass_graph_is_freed_before_the_occluded_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first pass's autograd graph (every saved activation: 94 MB for resnet50 at 224),
    kept for Grad-CAM's backward passes, must not sit under the peak of the occluded batches:
    the first convolution's output, saved for batch norm's backward, is gone when they run."""
    import weakref

    import gradcam_cli.explanation as E
    net, saved, alive, maps = small_net(), [], [], E.occlusion_maps
    handle = net[0].register_forward_hook(  # only the pass that builds a graph
        lambda _m, _i, out: saved.append(weakref.ref(out)) if out.requires_grad else None)

    def spying(*args: object) -> dict:
        alive.append([ref() is not None for ref in saved])
        return maps(*args)
    monkeypatch.setattr(E, "occlusion_maps", spying)
    try:
        explain(net, X[:1], "2", topk=1, methods=["gradcam", "occlusion"],
                settings=occluding(patches=(6,), stride=3))
    finally:
        handle.remove()
    assert alive == [[False]]


def test_without_a_gradient_method_the_first_pass_builds_no_graph() -> None:
    """Occlusion and RISE need only the scores: a graph for a backward pass never run would
    hold every activation (94 MB for resnet50 at 224) through the first pass."""
    net, graphs = small_net(), []
    handle = net[0].register_forward_hook(lambda _m, _i, out: graphs.append(out.requires_grad))
    try:
        explain(net, X[:1], "2", topk=1, methods=["occlusion", "rise"],
                settings=MethodSettings(occlusion=OcclusionSettings(patches=(6,), stride=3),
                                        rise=RiseSettings(n_masks=4, cell=4)))
        assert graphs and not any(graphs)
        explain(net, X[:1], "2", topk=1, methods=["occlusion", "gradcam"],
                settings=occluding(patches=(6,), stride=3))
    finally:
        handle.remove()
    assert any(graphs)


def test_a_model_in_training_mode_is_occluded_in_eval_mode_and_left_so() -> None:
    """Batch norm uses its running statistics (captum on the eval-mode model), and every
    submodule's training flag is given back."""
    net = small_net()
    expected = captum_map(net, X[:1], 6, 3, "zero", 0)
    net.train()
    net[2].eval()  # a mixed state, given back as it was
    result = explain(net, X[:1], "2", class_ids=[0], methods=["occlusion"],
                     settings=occluding(patches=(6,), stride=3))
    assert torch.allclose(result.maps["occlusion"][0, 0], expected, atol=1e-5)
    assert [m.training for m in net.modules()] == [True, True, True, False, True, True, True, True, True]


class Branching(nn.Module):
    """small_net behind a branch on the input's values, as some models rescale their input:
    torch.fx cannot trace it, so the passes run on the model itself."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped net's logits, of an input scaled down when it looks like 0..255 pixels."""
        if x.abs().amax() > 100:
            x = x / 255
        return self.net(x)


def test_a_model_that_cannot_be_traced_runs_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """The passes run on the model itself, and the map still equals captum's."""
    net, seen = Branching().eval(), passes_of(monkeypatch)
    expected = captum_map(net, X[:1], 6, 3, "zero", 0)
    result = explain(net, X[:1], "net.2", class_ids=[0], methods=["occlusion"],
                     settings=occluding(patches=(6,), stride=3))
    assert seen == [net]
    assert torch.allclose(result.maps["occlusion"][0, 0], expected, atol=1e-5)

@pytest.mark.parametrize(("kwargs", "argument"), [
    ({"patches": ()}, "patches"), ({"patches": (0,)}, "patches"), ({"patches": 5}, "patches"),
    ({"patches": (4, 8), "stride": 5}, "stride"), ({"stride": 0}, "stride"),
    ({"fill": "gray"}, "fill"), ({"border": "wrap"}, "border"),
])
def test_bad_settings_are_refused_naming_the_argument(kwargs: dict, argument: str) -> None:
    with pytest.raises(ArgumentError) as caught:
        OcclusionSettings(**kwargs)
    assert caught.value.argument == argument


def test_a_patch_larger_than_the_input_is_refused() -> None:
    with pytest.raises(ArgumentError, match="larger than the input") as caught:
        explain(small_net(), X[:1], "2", methods=["occlusion"], settings=occluding(patches=(18,)))
    assert caught.value.argument == "patches"


class FixedSize(nn.Module):
    """A network that takes only its own input size, as a ViT's patch embedding does."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.shape[-2:] == (20, 17), "wrong image size")
        return self.net(x)


def test_padding_a_model_that_takes_one_size_is_refused() -> None:
    with pytest.raises(ArgumentError, match="larger than its own") as caught:
        explain(FixedSize(), X[:1], "net.2", methods=["occlusion"],
                settings=occluding(patches=(5,), border="pad"))
    assert caught.value.argument == "border"


CLASSIFY = ["classify", "--arch", "resnet18", "--weights", "none", "--no-cuda", "--input-size", "64",
            "--topk", "1", "--json"]


def test_cli_patches_are_columns_recorded_and_redone_when_changed(tmp_path: Path) -> None:
    """A map per patch size, the settings in the record, a rerun with another patch redone
    (~15 s: three runs of a random resnet18 at 64 px)."""
    image = make_image(tmp_path / "a.png")
    base = [*CLASSIFY, "--image-path", str(image), "--output-dir", str(tmp_path / "o"),
            "--method", "occlusion", "--stride", "16", "--skip-existing"]
    args = [*base, "--patch", "16,32"]
    code, out, err = run(*args)
    assert code == 0, err
    record = json.loads(out)
    assert set(record["classes"][0]["maps"]) == {"occlusion-16", "occlusion-32"}
    assert record["settings"]["occlusion"] == {"patches": [16, 32], "stride": 16, "fill": "zero",
                                               "border": "edge"}
    assert json.loads(run(*args)[1])["status"] == "skipped"
    again = json.loads(run(*base, "--patch", "24")[1])
    assert again["status"] == "ok" and set(again["classes"][0]["maps"]) == {"occlusion"}


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "occlusion", "--patch", "0"], "--patch 0: "),
    (["--method", "occlusion", "--patch", "8", "--stride", "9"], "--stride 9: "),
    (["--method", "gradcam", "--patch", "8"], "--patch applies to --method occlusion"),
])
def test_cli_bad_occlusion_options_are_one_line(tmp_path: Path, extra: list[str], message: str) -> None:
    code, _, err = on_one_image(tmp_path, *CLASSIFY, *extra)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_compare_layers_refuses_occlusion(tmp_path: Path) -> None:
    code, err = compare_layers_error(tmp_path, "occlusion")
    assert code == 2 and "--method occlusion: does not depend on the layer" in err


def test_evaluate_measures_occlusion_maps(tmp_path: Path) -> None:
    """Curves and pointing games of an occlusion map beside Grad-CAM's (~8 s)."""
    code, out, err = evaluate_with_a_box(tmp_path, "--method", "gradcam,occlusion",
                                             "--patch", "16")
    assert code == 0, err
    record = json.loads(out.splitlines()[0])
    metrics = record["classes"][0]["metrics"]
    assert set(metrics) == {"gradcam", "occlusion"}
    occlusion = metrics["occlusion"]
    assert 0 <= occlusion["deletion_auc"] <= 1 and occlusion["pointing_hit"] in (True, False)
    assert record["settings"]["occlusion"]["patches"] == [16]


# Reuse: the layers before the first global one run once on the unoccluded image; each window
# recomputes them only on the region it changes (gradcam_cli/local.py).

REUSED = [  # arch, input (h, w), patch, stride, border, fill: every border, every fill, non-square
    ("resnet18", (64, 80), 16, 16, "edge", "zero"),
    ("resnet50", (64, 48), 24, 24, "pad", "mean"),
    ("vgg11", (48, 64), 24, 24, "edge", "blur"),
    ("mobilenet_v3_small", (64, 48), 16, 16, "pad", "blur"),
    ("convnext_tiny", (48, 64), 16, 16, "edge", "mean"),
    ("resnet18", (52, 44), 20, 8, "pad", "zero"),
]


def drops_both_ways(model: nn.Module, x: torch.Tensor, settings: OcclusionSettings,
                    batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, list]:
    """The window drops of the two top classes with reuse and with full passes, and the plans
    built, each with whether its self-check passed (``plan.agreed``)."""
    from gradcam_cli import local
    from gradcam_cli import occlusion as O
    fast = P.shared_graph(model.eval(), x)
    target = top_classes(topk=2)(model(x).detach())
    plans: list = []
    build, agrees = local.Reuse.build, O._agrees

    def spying(*args: object, **kwargs: object) -> object:
        plans.append(build(*args, **kwargs))
        return plans[-1]

    def checking(plan: local.Reuse, *args: object) -> bool:
        plan.agreed = agrees(plan, *args)
        return plan.agreed
    patch = settings.patches[0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(local.Reuse, "build", spying)
        mp.setattr(O, "_agrees", checking)
        reused = window_drops(fast, x, target, 0, patch, settings, batch_size)
    full = window_drops(fast, x, target, 0, patch, settings, batch_size, reuse=False)
    return reused, full, plans


@pytest.mark.parametrize(("arch", "size", "patch", "stride", "border", "fill"), REUSED)
def test_reused_prefix_equals_full_passes(monkeypatch: pytest.MonkeyPatch, arch: str, size: tuple[int, int],
                                          patch: int, stride: int, border: str, fill: str) -> None:
    """Random-weight torchvision models, reuse forced wherever a prefix exists: drops equal full
    passes to 1e-4 of the largest (~1-2 s each)."""
    from torchvision.models import get_model

    from gradcam_cli import local
    monkeypatch.setattr(local, "MIN_SAVING", 0.0)
    torch.manual_seed(5)
    model = get_model(arch, weights=None).eval()
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(2))
    settings = OcclusionSettings(patches=(patch,), stride=stride, fill=fill, border=border)
    reused, full, plans = drops_both_ways(model, x, settings)
    assert plans and plans[0] is not None, "no prefix found"
    assert plans[0].agreed, "the self-check refused the reused path"
    assert reused.shape == full.shape
    assert (reused - full).abs().max() <= 1e-4 * full.abs().max(), (reused - full).abs().max()


def test_reuse_is_chosen_where_it_pays_and_not_for_a_vit() -> None:
    """At 224 resnet50's prefix reaches past layer1; a ViT's patch embedding is followed by
    global attention, so it runs full passes (and still equals them)."""
    from torchvision.models import resnet50
    from torchvision.models.vision_transformer import VisionTransformer

    from gradcam_cli import local
    x = torch.randn(1, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    fast = P.shared_graph(resnet50().eval(), x)
    starts = torch.cartesian_prod(torch.arange(13) * 16, torch.arange(13) * 16)
    with torch.inference_mode(), local.counting(fast) as macs:
        fast(x)
        plan = local.Reuse.build(fast, x, torch.zeros_like(x), starts, 32, sum(macs))
    assert plan is not None
    convolutions = [s for s in plan.steps if s.kind == "window" and s.window.counted]
    assert len(convolutions) > 11, plan.cut  # the stem and layer1 have 11
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                            mlp_dim=32, num_classes=5).eval()
    reused, full, plans = drops_both_ways(vit, torch.randn(1, 3, 32, 32), OcclusionSettings(patches=(8,)))
    assert plans == [None] and torch.equal(reused, full)


def test_only_the_chosen_prefix_keeps_its_unoccluded_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Choosing the cut needs only shapes: keeping every local layer's map (all of resnet50 up
    to its pooling) would raise the peak above captum's; only maps the prefix reads outside a
    window's box are kept (at 224: 31 MB, against 55 MB for every input of a window or sum)."""
    from torchvision.models import resnet50

    from gradcam_cli import local
    x = torch.randn(1, 3, 160, 160).contiguous(memory_format=torch.channels_last)
    fast, kept, record = P.shared_graph(resnet50().eval(), x), [], local._record
    monkeypatch.setattr(local, "_record", lambda gm, steps, image, read: kept.append(set(read))
                        or record(gm, steps, image, read))
    starts = torch.cartesian_prod(torch.arange(9) * 16, torch.arange(9) * 16)
    with torch.inference_mode(), local.counting(fast) as macs:
        fast(x)
        plan = local.Reuse.build(fast, x, torch.zeros_like(x), starts, 32, sum(macs))
    assert plan is not None and kept
    prefix = {s.node for s in plan.steps}
    assert all(read <= prefix for read in kept), plan.cut
    assert set(plan.base) <= prefix
    pointwise = [s.args[0] for s in plan.steps if s.kind == "window" and s.window.kernel == (1, 1)
                 and s.window.stride == (1, 1) and s.window.padding == (0, 0) and len(s.args[0].users) == 1]
    assert pointwise and all(plan.base[n].is_meta for n in pointwise)  # a 1x1 convolution reads its box


def test_a_reused_path_that_disagrees_is_never_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The self-check runs a few windows both ways; any difference means full passes."""
    from torchvision.models import resnet18

    from gradcam_cli import local
    monkeypatch.setattr(local, "MIN_SAVING", 0.0)
    logits = local.Reuse.logits
    monkeypatch.setattr(local.Reuse, "logits", lambda self, chunk: logits(self, chunk) * 1.001)
    settings = OcclusionSettings(patches=(16,), stride=16)
    reused, full, plans = drops_both_ways(resnet18().eval(), torch.randn(1, 3, 64, 48), settings)
    assert plans and plans[0] is not None and not plans[0].agreed
    assert torch.equal(reused, full)


def test_reuse_on_a_small_net_equals_captum_for_every_fill_and_border(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A small net with a residual addition, max pooling, a dilation, a stride and a scalar
    product, reuse forced up to the last local node: equal to full passes for every fill and
    border, and to captum's map."""
    from gradcam_cli import local
    for free in ("BOX_COST", "COPY_COST", "MIN_SAVING"):  # boxes cost nothing: the deepest cut wins
        monkeypatch.setattr(local, free, 0.0)

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(4)
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2, padding=2), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, 1))
            self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardswish(),
                                      nn.Conv2d(8, 8, 3, padding=2, dilation=2))
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.stem(x)
            return self.head(torch.relu(y + self.body(y)) * 2.0)
    net, x = Residual().eval(), torch.randn(1, 3, 41, 33, generator=torch.Generator().manual_seed(6))
    for fill, border in [("zero", "edge"), ("mean", "pad"), ("blur", "pad")]:
        settings = OcclusionSettings(patches=(9,), stride=5, fill=fill, border=border)
        reused, full, plans = drops_both_ways(net, x, settings, batch_size=7)
        assert plans[0] is not None and plans[0].cut == "mul", plans[0] and plans[0].cut
        assert plans[0].agreed, (fill, border)
        assert (reused - full).abs().max() <= 1e-4 * full.abs().max(), (fill, border)
    result = explain(net, x, "stem.0", class_ids=[2], methods=["occlusion"],
                     settings=occluding(patches=(9,), stride=5, fill="blur"))
    expected = captum_map(net, x, 9, 5, "blur", 2)
    assert torch.allclose(result.maps["occlusion"][0, 0], expected, atol=1e-5)


def test_a_graph_whose_logits_differ_from_the_models_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should a trace not compute what the model computes (here: another net's graph), the
    passes run on the model itself."""
    net, other = small_net(), small_net(outputs=5)
    with torch.no_grad():
        other[0].weight.mul_(2)
    trace = torch.fx.symbolic_trace
    monkeypatch.setattr(P.fx, "symbolic_trace", lambda _module: trace(other))
    assert P.shared_graph(net, X[:1]) is net
    monkeypatch.setattr(P.fx, "symbolic_trace", lambda _module: trace(small_net()))
    assert isinstance(P.shared_graph(net, X[:1]), torch.fx.GraphModule)
