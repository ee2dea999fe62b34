"""The `gradcam` command end to end, in-process, with random weights."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from gradcam_cli import __version__
from gradcam_cli.cli import main
from gradcam_cli.methods import DEFAULT_METHODS, METHODS
from gradcam_cli.models import load_embedder
from gradcam_cli.render import GAP, LABEL_WIDTH, TITLE_HEIGHT

from .conftest import make_image

BASE = ["classify", "--arch", "resnet18", "--weights", "none", "--no-cuda"]


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def on_one_image(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    """``run`` with a fresh 64 px image and an output folder under ``tmp_path`` appended."""
    image = make_image(tmp_path / "a.png")
    return run(*args, "--image-path", str(image), "--output-dir", str(tmp_path / "o"))


def compare_layers_error(tmp_path: Path, method: str) -> tuple[int, str]:
    """compare-layers with one method on one image: exit code and stderr."""
    code, _, err = on_one_image(tmp_path, "compare-layers", "--arch", "resnet18", "--weights", "none",
                                "--no-cuda", "--method", method)
    return code, err


def evaluate_with_a_box(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    """evaluate (random resnet18 at 64 px, 2 steps, JSON) on one image with one box."""
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("image,x0,y0,x1,y1\na.png,1,1,20,20\n")
    return on_one_image(tmp_path, "evaluate", "--arch", "resnet18", "--weights", "none", "--no-cuda",
                        "--input-size", "64", "--steps", "2", "--json", "--boxes", str(boxes), *args)


COMMANDS = {"classify", "compare-layers", "embed", "evaluate", "segment", "detect", "layers",
            "architectures", "methods"}


def test_help_lists_every_command_and_version() -> None:
    code, out, _ = run("--help")
    assert code == 0
    listed = out.split("Commands:")[1].splitlines()
    assert {line.split()[0] for line in listed if line.strip()} == COMMANDS
    assert run("--version")[1].strip().endswith(__version__)


def test_module_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "gradcam_cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "classify" in out


def test_classify_writes_grid_maps_and_summary(photo: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "res"
    code, out, err = run(*BASE, "--image-path", str(photo), "--topk", "2",
                         "--output-dir", str(out_dir), "--json")
    assert code == 0, err
    assert "target layer layer4" in err
    record = json.loads(out)
    assert record["status"] == "ok" and record["layer"] == "layer4"
    assert [c["rank"] for c in record["classes"]] == [1, 2]
    probabilities = [c["probability"] for c in record["classes"]]
    assert probabilities == sorted(probabilities, reverse=True)
    for c in record["classes"]:
        assert set(c["maps"]) == set(DEFAULT_METHODS)
        for path in c["maps"].values():
            assert Image.open(path).size == (224, 224)
    cell = 224 + GAP  # every cell at the crop's own resolution
    assert Image.open(record["grid"]).size == (LABEL_WIDTH + 6 * cell, TITLE_HEIGHT + 2 * cell)
    assert json.loads(Path(record["summary"]).read_text()) == record
    assert not list(out_dir.rglob("*.tmp"))


def test_outputs_are_byte_identical_across_runs(photo: Path, tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        run(*BASE, "--image-path", str(photo), "--topk", "1", "--output-dir", str(tmp_path / name))
        runs.append({p.relative_to(tmp_path / name): p.read_bytes()
                     for p in sorted((tmp_path / name).rglob("*")) if p.is_file()})
    summaries = [p for p in runs[0] if p.suffix == ".json"]
    assert len(runs[0]) == 8 and len(summaries) == 1  # the image's 7 files and the folder's index.html
    assert runs[0].keys() == runs[1].keys()
    for path in runs[0]:
        if path.suffix in (".png", ".html"):
            assert runs[0][path] == runs[1][path], path
    # summaries name their own folder, so compare them with the folder name swapped
    assert runs[0][summaries[0]].replace(b"/a/", b"/b/") == runs[1][summaries[0]]


def test_table_and_class_ids(photo: Path, tmp_path: Path) -> None:
    code, out, _ = run(*BASE, "--image-path", str(photo), "--class-id", "285", "--class-id", "1",
                       "--method", "gradcam", "--output-dir", str(tmp_path))
    assert code == 0
    assert "Egyptian cat" in out and "goldfish" in out
    assert len(list(tmp_path.rglob("gradcam.png"))) == 2
    assert not list(tmp_path.rglob("vanilla.png"))


def test_bad_image_fails_alone(photo: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_text("not a jpeg")
    code, out, err = run(*BASE, "--image-path", str(bad), "--image-path", str(photo),
                         "--topk", "1", "--json", "--output-dir", str(tmp_path / "o"))
    assert code == 1
    assert err.count("broken.jpg") == 1 and "not an image" in err
    statuses = [json.loads(line)["status"] for line in out.splitlines()]
    assert statuses == ["error", "ok"]


@pytest.mark.parametrize("args,message", [
    (["--arch", "resnet1"], "--arch resnet1: unknown architecture; did you mean resnet18"),
    (["--layer", "layer5"], "--layer layer5: unknown layer; did you mean layer"),
    (["--cuda"], "--cuda: no CUDA device"),
    (["--class-id", "1000"], "--class-id 1000: outside 0..999"),
    (["--topk", "1001"], "--topk 1001: must be between 1 and 1000"),
    (["--weights", "missing.pt"], "--weights missing.pt: no such checkpoint"),
    (["--method", "gradcam,gradcampp"],
     "--method gradcampp: unknown method; did you mean gradcam, xgradcam, gradcam++"),
])
def test_usage_errors_exit_2_with_one_line(photo: Path, tmp_path: Path, args: list[str],
                                           message: str) -> None:
    argv = ["classify", "--arch", "resnet18", "--weights", "none", "--image-path", str(photo),
            "--output-dir", str(tmp_path), "--layer", "layer4", *args]  # no default-layer notice
    if "--cuda" in args:
        pytest.importorskip("torch").cuda.is_available() and pytest.skip("CUDA is available")
    code, out, err = run(*argv)
    assert code == 2 and out == ""
    assert err.splitlines() == [err.strip()] and err.startswith(f"gradcam: error: {message}"), err


@pytest.mark.parametrize("argv,message", [
    (["classify", "--image-path", "a.jpg"], "Missing option '--arch'"),
    ([*BASE, "--image-path", "a.jpg", "--topk", "x"], "'x' is not a valid integer"),
    ([*BASE, "--image-path", "a.jpg", "--bogus"], "No such option '--bogus'"),
    (["evaluate", "--arch", "resnet18", "--baseline", "blurr"], "'blurr' is not one of"),
    (["clasify", "--arch", "resnet18"], "No such command 'clasify'"),
    (["--bogus"], "No such option '--bogus'"),
    (["embed", "--reference", "a.jpg", "--image-path", "b.jpg"], "Missing option '--arch'"),
    (["embed", "build-proxies", "folder", "--arch", "resnet18"], "Missing option '--output'"),
])
def test_click_usage_errors_are_one_line_like_the_tools_own(argv: list[str], message: str) -> None:
    code, out, err = run(*argv)
    assert code == 2 and out == ""
    assert err.splitlines() == [err.strip()] and err.startswith("gradcam: error: ") and message in err, err


def test_library_errors_are_said_with_their_flags(photo: Path, tmp_path: Path) -> None:
    code, out, err = run(*EMBED, "--proxy-file", str(tmp_path / "p.pt"), "--image-path", str(photo),
                         "--output-dir", str(tmp_path))
    assert code == 2 and out == ""
    assert err.strip() == f"gradcam: error: --proxy-file {tmp_path / 'p.pt'}: no such file"


def test_ctrl_c_while_the_model_loads_is_one_line_and_130(photo: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt
    monkeypatch.setattr("gradcam_cli.models.load_model", interrupted)
    code, out, err = run(*BASE, "--image-path", str(photo), "--output-dir", str(tmp_path))
    assert code == 130 and out == ""
    assert err.splitlines() == ["gradcam: interrupted by SIGINT"], err


def chatty(real: Callable[..., object]) -> Callable[..., object]:
    """``real``, printing on stdout first as torch does while it downloads weights."""
    def load(*args: object, **kwargs: object) -> object:
        print('Downloading: "https://download.pytorch.org/models/x.pth" to /tmp/x.pth')
        return real(*args, **kwargs)
    return load


def test_stdout_holds_only_records_while_weights_download(photo: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from gradcam_cli import models
    monkeypatch.setattr(models, "load_model", chatty(models.load_model))
    monkeypatch.setattr(models, "load_embedder", chatty(models.load_embedder))
    code, out, err = run(*BASE, "--image-path", str(photo), "--output-dir", str(tmp_path), "--json",
                         "--topk", "1", "--method", "gradcam")
    assert code == 0 and [json.loads(line)["status"] for line in out.splitlines()] == ["ok"]
    assert "Downloading" in err
    code, out, _ = run("layers", "--arch", "resnet18")
    assert code == 0 and "Downloading" not in out
    folder = exemplar_folder(tmp_path / "ex", photo)
    code, out, err = run("embed", "build-proxies", str(folder), "--output", str(tmp_path / "p.pt"),
                         "--arch", "resnet18", "--weights", "none", "--no-cuda")
    assert code == 0 and out == "" and "Downloading" in err


def test_layers_lists_shapes_and_default() -> None:
    code, out, _ = run("layers", "--arch", "resnet18")
    assert code == 0
    assert "*s layer4" in out and "512x7x7" in out
    stages = [line.split()[1] for line in out.splitlines()[1:] if line[1] == "s"]
    assert stages == ["layer1", "layer2", "layer3", "layer4"]


def test_methods_lists_each_method_with_a_description() -> None:
    code, out, _ = run("methods")
    lines = out.splitlines()
    assert code == 0 and [line.split()[0] for line in lines] == list(METHODS)
    assert all(len(line.split()) > 4 for line in lines)
    assert sum("(default)" in line for line in lines) == len(DEFAULT_METHODS)


def test_comma_separated_and_repeated_methods(photo: Path, tmp_path: Path) -> None:
    code, out, err = run(*BASE, "--image-path", str(photo), "--output-dir", str(tmp_path),
                         "--topk", "2", "--method", "gradcam++,eigencam", "--method", "ablationcam",
                         "--batch-size", "128", "--json")
    assert code == 0, err
    record = json.loads(out)
    for c in record["classes"]:
        assert set(c["maps"]) == {"gradcam++", "eigencam", "ablationcam"}
    grid = Image.open(record["grid"])
    cell = 224 + GAP
    assert grid.size == (LABEL_WIDTH + 4 * cell, TITLE_HEIGHT + 2 * cell)


def test_compare_layers_defaults_to_the_stages(photo: Path, tmp_path: Path) -> None:
    args = ["compare-layers", "--arch", "resnet18", "--weights", "none", "--image-path", str(photo),
            "--output-dir", str(tmp_path), "--json"]
    code, out, err = run(*args)
    assert code == 0, err
    assert "layers layer1, layer2, layer3, layer4" in err
    record = json.loads(out)
    assert record["layers"] == ["layer1", "layer2", "layer3", "layer4"]
    (only,) = record["classes"]
    assert list(only["maps"]) == record["layers"]
    for layer, files in only["maps"].items():
        assert Path(files["gradcam"]).is_file() and f"/{layer}/gradcam.png" in files["gradcam"]
    cell = 224 + GAP
    assert Image.open(record["grid"]).size == (LABEL_WIDTH + 2 * cell, TITLE_HEIGHT + 4 * cell)
    code, out, _ = run(*args, "--skip-existing")
    assert code == 0 and json.loads(out)["status"] == "skipped"
    code, out, _ = run(*args, "--skip-existing", "--layers", "layer3")  # another job: not skipped
    assert code == 0 and json.loads(out)["status"] == "ok"


def test_compare_layers_chosen_layers_methods_and_classes(photo: Path, tmp_path: Path) -> None:
    code, out, err = run("compare-layers", "--arch", "resnet18", "--weights", "none",
                         "--image-path", str(photo), "--output-dir", str(tmp_path), "--json",
                         "--layers", "layer3,layer4", "--method", "gradcam,layercam", "--topk", "2")
    assert code == 0, err
    record = json.loads(out)
    assert [list(c["maps"]) for c in record["classes"]] == [["layer3", "layer4"]] * 2
    cell = 224 + GAP
    assert Image.open(record["grid"]).size == (LABEL_WIDTH + 3 * cell, TITLE_HEIGHT + 4 * cell)


def test_compare_layers_refuses_layer_independent_methods(photo: Path, tmp_path: Path) -> None:
    code, out, err = run("compare-layers", "--arch", "resnet18", "--weights", "none",
                         "--image-path", str(photo), "--output-dir", str(tmp_path),
                         "--method", "vanilla", "--layers", "layer4")  # no default-layers notice
    assert code == 2 and out == "" and err.splitlines() == [err.strip()], err
    assert err.startswith("gradcam: error: --method vanilla: does not depend on the layer")


EMBED = ["embed", "--arch", "resnet18", "--weights", "none", "--no-cuda"]


def exemplar_folder(root: Path, photo: Path) -> Path:
    """Two classes: 'cat' with the photo and a ramp, 'ramp' with another ramp."""
    (root / "cat").mkdir(parents=True)
    Image.open(photo).save(root / "cat" / "cat.png")
    make_image(root / "cat" / "r1.png", size=(80, 60))
    make_image(root / "ramp" / "r2.png", size=(60, 80))
    return root


def test_embed_with_proxies_from_a_folder_and_from_a_file(photo: Path, tmp_path: Path) -> None:
    folder = exemplar_folder(tmp_path / "ex", photo)
    query = folder / "cat" / "cat.png"
    code, out, err = run(*EMBED, "--proxies", str(folder), "--image-path", str(query),
                         "--output-dir", str(tmp_path / "o1"), "--json", "--method", "gradcam")
    assert code == 0, err
    record = json.loads(out)
    assert [c["name"] for c in record["classes"]] and all("similarity" in c for c in record["classes"])
    assert "@layer4-embed" in record["grid"] and Path(record["grid"]).is_file()
    code, _, err = run("embed", "build-proxies", str(folder), "--output", str(tmp_path / "p.pt"),
                       "--arch", "resnet18", "--weights", "none", "--no-cuda")
    assert code == 0 and "3 exemplars of 2 classes" in err
    code, out2, _ = run(*EMBED, "--proxy-file", str(tmp_path / "p.pt"), "--image-path", str(query),
                        "--output-dir", str(tmp_path / "o2"), "--json", "--method", "gradcam")
    again = json.loads(out2)
    assert [(c["name"], c["similarity"]) for c in again["classes"]] == \
        [(c["name"], c["similarity"]) for c in record["classes"]]


def embed_pair(photo: Path, tmp_path: Path, *options: str) -> dict[str, dict]:
    """Run embed with the photo as query and a ramp as reference; records by file name."""
    other = make_image(tmp_path / "ref.png", size=(80, 60))
    code, out, err = run(*EMBED, "--reference", str(other), "--image-path", str(photo),
                         "--output-dir", str(tmp_path / "o"), "--json", *options)
    assert code == 0, err
    return {Path(r["image"]).name: r for r in map(json.loads, out.splitlines())}


def test_embed_references_explains_both_sides(photo: Path, tmp_path: Path) -> None:
    records = embed_pair(photo, tmp_path, "--method", "gradcam", "--similarity", "cosine")
    assert [c["name"] for c in records["cat.jpg"]["classes"]] == ["ref.png"]
    assert [c["name"] for c in records["ref.png"]["classes"]] == ["cat.jpg"]
    assert records["cat.jpg"]["classes"][0]["similarity"] == \
        records["ref.png"]["classes"][0]["similarity"]  # cosine is symmetric


def test_embed_needs_exactly_one_source(photo: Path, tmp_path: Path) -> None:
    code, out, err = run(*EMBED, "--image-path", str(photo), "--output-dir", str(tmp_path))
    assert code == 2 and out == "" and err.splitlines() == [err.strip()], err
    assert err.startswith("gradcam: error: give exactly one of --reference")


def test_embed_topk_with_references_is_honoured(photo: Path, tmp_path: Path) -> None:
    refs = [str(make_image(tmp_path / f"ref{i}.png", size=(60 - 20 * i, 60))) for i in (0, 1)]
    every = embed_pair(photo, tmp_path, "--method", "gradcam", "--reference", refs[0],
                       "--reference", refs[1])
    assert len(every["cat.jpg"]["classes"]) == 3  # default: every reference
    top = embed_pair(photo, tmp_path / "k", "--method", "gradcam", "--reference", refs[0],
                     "--reference", refs[1], "--topk", "2")
    assert [c["similarity"] for c in top["cat.jpg"]["classes"]] == \
        [c["similarity"] for c in every["cat.jpg"]["classes"]][:2]


def shared_help(command: click.Command) -> dict[str, str]:
    """Each option of a command and its help text."""
    return {p.opts[0]: p.help for p in command.params if isinstance(p, click.Option)}


def test_embed_shares_the_options_and_help_texts_of_the_other_commands() -> None:
    embed, build = main.commands["embed"], main.commands["embed"].commands["build-proxies"]
    classify = shared_help(main.commands["classify"])
    own = shared_help(embed)
    # embed ranks proxies or references, not classes; its --layers gives rows, classify's fuses maps
    shared = set(classify) & set(own) - {"--topk", "--layers"}
    assert {"--arch", "--weights", "--cuda", "--layer", "--method", "--batch-size"} <= shared
    assert {o: own[o] for o in shared} == {o: classify[o] for o in shared}
    assert {o: h for o, h in shared_help(build).items() if o in own} == \
        {o: own[o] for o in shared_help(build) if o in own}
    assert next(p for p in embed.params if p.name == "arch").required


def test_embed_with_a_trained_embedding_checkpoint(photo: Path, tmp_path: Path) -> None:
    model = load_embedder("resnet18", "none", embedding_dim=8)
    torch.save(model.module.state_dict(), tmp_path / "embedder.pt")
    reference = make_image(tmp_path / "ref.png")
    args = [*EMBED[:2], "resnet18", "--no-cuda", "--embedding-dim", "8", "--reference", str(reference),
            "--image-path", str(photo), "--output-dir", str(tmp_path / "o"), "--method", "gradcam"]
    code, _, err = run(*args, "--weights", str(tmp_path / "embedder.pt"))
    assert code == 0, err
    code, _, err = run(*args[:5], "16", *args[6:], "--weights", str(tmp_path / "embedder.pt"))
    assert code == 2 and "fc.weight: checkpoint (8, 512) vs model (16, 512)" in err


def test_embed_rows_per_layer(photo: Path, tmp_path: Path) -> None:
    record = embed_pair(photo, tmp_path, "--method", "gradcam,layercam",
                        "--layers", "layer3,layer4")["cat.jpg"]
    assert record["layers"] == ["layer3", "layer4"] and "@layers-embed" in record["grid"]
    assert list(record["classes"][0]["maps"]) == ["layer3", "layer4"]


EVALUATE = ["evaluate", "--arch", "resnet18", "--weights", "none", "--no-cuda", "--steps", "2",
            "--method", "gradcam"]


def test_evaluate_prints_the_table_and_writes_it(photo: Path, tmp_path: Path) -> None:
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(f"image,x0,y0,x1,y1\n{photo.name},60,20,200,160\n")
    out_dir = tmp_path / "res"
    code, out, err = run(*EVALUATE, "--image-path", str(photo), "--boxes", str(boxes),
                         "--output-dir", str(out_dir), "--sanity")
    assert code == 0, err
    assert "deletion AUC" in out and "pointing game" in out and "sanity" in out
    table = (out_dir / "evaluate-resnet18@layer4.csv").read_text().splitlines()
    assert table[0].startswith("image,class_id,name,method,deletion_auc") and len(table) == 2
    sanity = (out_dir / "evaluate-resnet18@layer4-sanity.csv").read_text().splitlines()
    assert sanity[0] == "image,class_id,method,step,block,spearman"
    assert sanity[1].split(",")[3:5] == ["1", "fc"] and sanity[-1].split(",")[4] == "conv1"
    assert (out_dir / "evaluate-resnet18@layer4-sanity.png").is_file()
    code, out, err = run(*EVALUATE, "--image-path", str(photo), "--output-dir", str(out_dir),
                         "--json")
    assert code == 0 and json.loads(out)["status"] == "ok" and "deletion AUC" in err


def test_evaluate_refuses_bad_ground_truth_in_one_line(photo: Path, tmp_path: Path) -> None:
    bad = tmp_path / "boxes.csv"
    bad.write_text("name,left\ncat.jpg,3\n")
    for extra in (["--boxes", str(bad)], ["--boxes", str(bad), "--masks", str(tmp_path)],
                  ["--masks", str(tmp_path / "none")]):
        code, out, err = run(*EVALUATE, "--image-path", str(photo), *extra)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
        assert "--boxes" in err or "--masks" in err
