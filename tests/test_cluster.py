"""--ray: the same batches on a local Ray cluster of 2 CPUs give the files and records of a plain
run; a killed actor's batch is retried once; Ctrl-C leaves only whole files."""

from __future__ import annotations

import builtins
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import torchvision
from PIL import Image

from gradcam_cli.cluster import RayEngine
from gradcam_cli.errors import ArgumentError
from gradcam_cli.pipeline import classify

from .scenes import distinct_images
from .test_cli import run

CLASSIFY = ["classify", "--arch", "resnet18", "--weights", "none", "--no-cuda", "--input-size", "64",
            "--method", "gradcam,vanilla", "--topk", "2", "--batch-size", "2", "--json"]


@pytest.fixture(scope="module")
def cluster() -> object:
    """One local cluster of 2 CPUs for the in-process tests (the engine leaves it running), and
    builtins.print put back after it, as the engine does for a cluster it starts."""
    printer = builtins.print
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    builtins.print = printer


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, the folder's own name taken out of its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes().replace(str(folder).encode(), b"OUT")
            for p in sorted(folder.rglob("*")) if p.is_file()}


def images_with_a_bad_one(folder: Path) -> Path:
    """Five images of two sizes, and a file that is no image."""
    distinct_images(folder, 3)
    distinct_images(folder / "wide", 2, size=(120, 50))
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def test_ray_run_writes_the_files_records_and_exit_code_of_a_plain_run(cluster: object,
                                                                       tmp_path: Path) -> None:
    images = images_with_a_bad_one(tmp_path / "imgs")
    plain, spread = tmp_path / "plain", tmp_path / "ray"
    code, out, _ = run(*CLASSIFY, "--image-path", str(images), "--output-dir", str(plain))
    ray_code, ray_out, err = run(*CLASSIFY, "--image-path", str(images), "--output-dir", str(spread),
                                 "--ray", "--workers", "2")
    assert (ray_code, code) == (1, 1), err  # the broken file fails alone, in both
    assert ray_out.replace(str(spread), "OUT") == out.replace(str(plain), "OUT")  # same lines, same order
    assert [json.loads(line)["status"] for line in ray_out.splitlines()].count("ok") == 5
    assert tree(spread) == tree(plain)  # every PNG, summary and the index byte for byte
    again = run(*CLASSIFY, "--image-path", str(images), "--output-dir", str(spread), "--ray",
                "--skip-existing")
    assert again[0] == 1
    assert [json.loads(line)["status"] for line in again[1].splitlines()].count("skipped") == 5


def test_ray_options_without_ray_are_refused(tmp_path: Path) -> None:
    code, out, err = run(*CLASSIFY, "--image-path", str(tmp_path), "--workers", "2")
    assert code == 2 and not out and err.strip() == "gradcam: error: --workers applies with --ray"


def test_ray_engine_checks_its_numbers() -> None:
    with pytest.raises(ArgumentError, match="workers"):
        RayEngine(workers=0)
    with pytest.raises(ArgumentError, match="gpus_per_worker"):
        RayEngine(gpus_per_worker=-1.0)


class DiesOnce(torch.nn.Module):
    """A resnet18 whose process kills itself (SIGKILL) at its first forward pass outside the
    process that built it while ``marker`` exists, removing it first: one Ray actor dies
    mid-run, and the call retried on its replacement lives."""

    def __init__(self, marker: str | None, num_classes: int = 4) -> None:
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=num_classes)
        self.marker, self.driver = marker, os.getpid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.marker and os.getpid() != self.driver and os.path.exists(self.marker):
            os.unlink(self.marker)
            os.kill(os.getpid(), signal.SIGKILL)
        return self.net(x)


def dies_once(num_classes: int = 4) -> torch.nn.Module:
    """``--arch module:tests.test_cluster:dies_once``: a ``DiesOnce`` whose marker is the file
    $GRADCAM_TEST_DIE names (none: it never dies)."""
    return DiesOnce(os.environ.get("GRADCAM_TEST_DIE"), num_classes)


def test_a_killed_actor_is_retried_without_losing_or_repeating_an_image(tmp_path: Path) -> None:
    images = distinct_images(tmp_path / "imgs", 8)[0].parent
    marker = tmp_path / "die"
    marker.touch()
    argv = [sys.executable, "-m", "gradcam_cli", "classify", "--arch", "module:tests.test_cluster:dies_once",
            "--num-classes", "4", "--layer", "net.layer4", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5",
            *CLASSIFY[3:], "--image-path", str(images)]
    plain = subprocess.run([*argv, "--output-dir", str(tmp_path / "plain")], capture_output=True,
                           text=True, env={**os.environ, "GRADCAM_TEST_DIE": ""})
    spread = subprocess.run([*argv, "--output-dir", str(tmp_path / "ray"), "--ray", "--workers", "2"],
                            capture_output=True, text=True,
                            env={**os.environ, "GRADCAM_TEST_DIE": str(marker)})
    assert (plain.returncode, spread.returncode) == (0, 0), spread.stderr
    assert not marker.exists()  # an actor did die
    records = [json.loads(line) for line in spread.stdout.splitlines()]  # stdout: records only
    assert [r["image"] for r in records] == [json.loads(line)["image"] for line in plain.stdout.splitlines()]
    assert len(records) == 8 and all(r["status"] == "ok" for r in records)
    assert tree(tmp_path / "ray") == tree(tmp_path / "plain")


LEAVES_PRINT = """
import builtins, sys
import ray.experimental.tqdm_ray as bars
from gradcam_cli.cluster import RayEngine
from gradcam_cli.models import load_model
from gradcam_cli.pipeline import classify
printer = builtins.print
def stop():
    bars.instance()  # what Ray's driver does when it prints a worker's or the raylet's message
    return False
model = load_model("resnet18", "none", preprocess={"input_size": (64, 64)})
records = list(classify(model, sys.argv[1:3], output_dir=sys.argv[3], topk=1, methods=["gradcam"],
                        stop=stop, engine=RayEngine(workers=1)))
assert [r["status"] for r in records] == ["ok", "ok"], records
assert builtins.print is printer, builtins.print
"""


def test_a_run_that_starts_its_own_cluster_leaves_builtins_print_as_it_was(tmp_path: Path) -> None:
    images = distinct_images(tmp_path / "imgs", 2)
    done = subprocess.run([sys.executable, "-c", LEAVES_PRINT, *map(str, images), str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def ray_run_of_40_with_a_first_summary(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """A --ray run of 40 images in its own process group (as a terminal's job), and its output
    folder, once the first image's summary is written."""
    images = distinct_images(tmp_path / "imgs", 40)
    out = tmp_path / "o"
    argv = [sys.executable, "-m", "gradcam_cli", *CLASSIFY, "--image-path", str(images[0].parent),
            "--output-dir", str(out), "--ray", "--workers", "2"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(out.rglob("summary.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return process, out


def test_ctrl_c_stops_the_cluster_run_leaving_only_whole_files(tmp_path: Path) -> None:
    process, out = ray_run_of_40_with_a_first_summary(tmp_path)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches every process of the group
    stdout, stderr = process.communicate(timeout=300)
    records = [json.loads(line) for line in stdout.splitlines()]
    assert process.returncode == 130, stderr
    assert 0 < len(records) < 40 and all(r["status"] == "ok" for r in records)
    assert [r["image"] for r in records] == sorted(r["image"] for r in records)  # input order
    assert not list(out.rglob("*.tmp"))
    for png in out.rglob("*.png"):
        Image.open(png).verify()  # whole
    written = {out.joinpath(*p.relative_to(out).parts[:2]) for p in out.rglob("grid.png")}
    assert {Path(r["summary"]).parent for r in records} == written  # reported = written


def test_a_second_ctrl_c_stops_at_once_reporting_only_whole_written_images(tmp_path: Path) -> None:
    process, out = ray_run_of_40_with_a_first_summary(tmp_path)
    os.killpg(process.pid, signal.SIGINT)
    time.sleep(0.5)
    assert process.poll() is None  # still winding down: the second signal meets a running run
    os.killpg(process.pid, signal.SIGINT)  # the second: stop without finishing the batches under way
    stdout, stderr = process.communicate(timeout=300)
    records = [json.loads(line) for line in stdout.splitlines()]
    assert process.returncode == 130, stderr
    assert all(r["status"] == "ok" for r in records)
    assert len(records) < 40
    assert not list(out.rglob("*.tmp"))  # no actor left a write behind
    for png in out.rglob("*.png"):
        Image.open(png).verify()
    written = {out.joinpath(*p.relative_to(out).parts[:2]) for p in out.rglob("summary.json")}
    assert {Path(r["summary"]).parent for r in records} <= written  # reported only what is written


def test_auto_joins_the_running_cluster_and_no_address_starts_a_local_one(tmp_path: Path) -> None:
    images = distinct_images(tmp_path / "imgs", 1)[0]
    start = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--num-cpus", "1", "--port", "0",
             "--include-dashboard", "false", "--disable-usage-stats", "--block"]
    latest = Path(ray._private.utils.get_ray_address_file(None))  # where `ray start` notes its cluster
    before = latest.read_bytes() if latest.exists() else None
    head = subprocess.Popen(start, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        for line in head.stdout:  # a cluster of 1 CPU, started as `ray start` starts one
            if "Ray runtime started" in line:
                break
        argv = [sys.executable, "-m", "gradcam_cli", *CLASSIFY, "--image-path", str(images), "--workers", "2"]
        joined = subprocess.run([*argv, "--output-dir", str(tmp_path / "a"), "--ray", "auto"],
                                capture_output=True, text=True)
        local = subprocess.run([*argv, "--output-dir", str(tmp_path / "b"), "--ray"], capture_output=True,
                               text=True)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.communicate(timeout=60)
        latest.unlink(missing_ok=True)  # ray.init() would go on trying the dead cluster's address
        if before is not None:
            latest.write_bytes(before)
    assert joined.returncode == 2 and "the cluster has 1" in joined.stderr.splitlines()[-1], joined.stderr
    assert local.returncode == 0, local.stderr  # its own cluster, of this machine's 2 CPUs


def quiet_settings(ray: object) -> tuple:
    """What a run quiets for its own stdout: Ray Data's progress bars and start-up line, and
    its logger's level."""
    context = ray.data.DataContext.get_current()
    return context.enable_progress_bars, context.print_on_execution_start, logging.getLogger("ray.data").level


def set_quiet_settings(ray: object, bars: bool, start_line: bool, level: int) -> None:
    """Set what ``quiet_settings`` reads."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars, context.print_on_execution_start = bars, start_line
    logging.getLogger("ray.data").setLevel(level)


def test_runs_in_the_callers_session_leave_its_ray_data_settings_as_they_were(cluster: object,
                                                                              tmp_path: Path) -> None:
    from gradcam_cli.cluster import explain_dataset
    from gradcam_cli.models import load_model
    paths = distinct_images(tmp_path / "imgs", 2)
    model = load_model("resnet18", "none", preprocess={"input_size": (64, 64)})
    before = quiet_settings(cluster)
    set_quiet_settings(cluster, True, True, logging.INFO)
    try:
        records = list(classify(model, paths, tmp_path / "o", topk=1, methods=["gradcam"],
                                engine=RayEngine(workers=1)))
        assert [r["status"] for r in records] == ["ok", "ok"]
        assert quiet_settings(cluster) == (True, True, logging.INFO)
        explain_dataset(ray.data.from_items([{"path": str(p)} for p in paths]), model,
                        output_dir=tmp_path / "d", topk=1, methods=["gradcam"], engine=RayEngine(workers=1))
        assert quiet_settings(cluster) == (True, True, logging.INFO)  # the caller runs it, as they set
    finally:
        set_quiet_settings(cluster, *before)


@pytest.mark.parametrize("command", [Path("results"), lambda *args, **options: iter(())],
                         ids=["a path", "a function of no pipeline"])
def test_explain_dataset_refuses_a_command_that_is_no_pipeline(command: object) -> None:
    from gradcam_cli.cluster import explain_dataset
    from gradcam_cli.models import load_model
    model = load_model("resnet18", "none", preprocess={"input_size": (64, 64)})
    with pytest.raises(ArgumentError, match=r"command=.*is not a gradcam pipeline \(classify, "):
        explain_dataset(None, model, command)


def test_explain_dataset_gives_a_plain_runs_records_files_and_maps(cluster: object, tmp_path: Path) -> None:
    from gradcam_cli.cluster import explain_dataset
    from gradcam_cli.explanation import explain
    from gradcam_cli.models import load_model
    paths = distinct_images(tmp_path / "imgs", 3)
    model = load_model("resnet18", "none", preprocess={"input_size": (64, 64)})
    plain = list(classify(model, paths, tmp_path / "plain", topk=2, methods=["gradcam"], batch_size=2))
    dataset = ray.data.from_items([{"path": str(p)} for p in paths], override_num_blocks=2)
    rows = explain_dataset(dataset, model, output_dir=tmp_path / "ray", topk=2, methods=["gradcam"],
                           batch_size=2, maps=True, engine=RayEngine(workers=2)).take_all()
    assert [json.loads(r["record"]) for r in rows] == \
        [json.loads(json.dumps(r).replace(str(tmp_path / "plain"), str(tmp_path / "ray"))) for r in plain]
    pages = {"index.html"}  # the command line's page; this call writes none of its own
    assert {k: v for k, v in tree(tmp_path / "ray").items() if k not in pages} == \
        {k: v for k, v in tree(tmp_path / "plain").items() if k not in pages}
    x = torch.stack([model.preprocess.to_tensor(model.preprocess.model_pixels(Image.open(p).convert("RGB")))
                     for p in paths])
    expected = explain(model.module, x, "layer4", topk=2, methods=["gradcam"]).maps["gradcam"]
    for row, maps in zip(rows, expected, strict=True):
        torch.testing.assert_close(torch.from_numpy(row["map_gradcam"][0]), maps)


def test_explain_dataset_explains_the_pixels_of_an_image_column_not_the_file(cluster: object,
                                                                            tmp_path: Path) -> None:
    from gradcam_cli.cluster import explain_dataset
    from gradcam_cli.explanation import explain
    from gradcam_cli.models import load_model
    paths = distinct_images(tmp_path / "imgs", 2)
    flipped = np.ascontiguousarray(np.asarray(Image.open(paths[0]).convert("RGB"))[:, ::-1])
    grey = np.asarray(Image.open(paths[1]).convert("L"))  # HxW, as a one-channel read gives it
    model = load_model("resnet18", "none", preprocess={"input_size": (64, 64)})
    dataset = ray.data.from_items([{"path": str(paths[0]), "image": flipped},
                                   {"path": str(paths[1]), "image": grey}],
                                  override_num_blocks=2)  # a block each: Ray gives a lone grey image as HxW
    rows = explain_dataset(dataset, model, output_dir=tmp_path / "ray", topk=1, methods=["gradcam"],
                           batch_size=1, maps=True, engine=RayEngine(workers=1)).take_all()
    assert [r["status"] for r in rows] == ["ok", "ok"], [r["record"] for r in rows]
    pixels = [Image.fromarray(flipped), Image.fromarray(grey).convert("RGB")]
    x = torch.stack([model.preprocess.to_tensor(model.preprocess.model_pixels(p)) for p in pixels])
    expected = explain(model.module, x, "layer4", topk=1, methods=["gradcam"]).maps["gradcam"]
    for row, maps in zip(rows, expected, strict=True):
        torch.testing.assert_close(torch.from_numpy(np.array(row["map_gradcam"][0])), maps)


def test_explain_dataset_refuses_pixels_it_would_misread_row_by_row(cluster: object, tmp_path: Path) -> None:
    from gradcam_cli.cluster import explain_dataset
    from gradcam_cli.models import load_model
    paths = distinct_images(tmp_path / "imgs", 3)
    colour = np.asarray(Image.open(paths[0]).convert("RGB"))
    grey = np.asarray(Image.open(paths[1]).convert("L"))
    model = load_model("resnet18", "none", preprocess={"input_size": (64, 64)})

    def statuses(rows: list[dict]) -> list[tuple[str, str]]:
        out = explain_dataset(ray.data.from_items(rows), model, output_dir=tmp_path / "ray", topk=1,
                              methods=["gradcam"], batch_size=len(rows), engine=RayEngine(workers=1))
        return [(r["status"], json.loads(r["record"]).get("error", "")) for r in out.take_all()]

    floats = statuses([{"path": str(paths[0]), "image": grey.astype(np.float32) / 255}])  # PIL: pixels 0, 1
    mixed = statuses([{"path": str(paths[1]), "image": grey},  # beside a colour image Ray gives it as 1xHxW
                      {"path": str(paths[2]), "image": colour}])
    assert [status for status, _ in floats + mixed] == ["error", "error", "ok"]
    errors = [error for _, error in floats + mixed]
    assert errors[0] == f"{paths[0]}: image column: float32 pixels; give uint8 (0-255)"
    assert errors[1] == (f"{paths[1]}: image column: an array of shape (1, 80, 96); give HxW or HxWx3 "
                         "(ray.data.read_images(..., mode='RGB') gives every image so)")


def test_a_pool_the_cluster_cannot_hold_is_one_line_not_a_hang(cluster: object, tmp_path: Path) -> None:
    images = distinct_images(tmp_path / "imgs", 1)[0]
    code, out, err = run(*CLASSIFY, "--image-path", str(images), "--output-dir", str(tmp_path / "o"),
                         "--ray", "--workers", "3")
    assert code == 2 and not out
    assert err.splitlines()[-1] == ("gradcam: error: --workers 3: 3 workers of 1 CPU need 3; the cluster "
                                    "has 2: give fewer workers or less per worker (--cpus-per-worker)")
    code, _, err = run(*CLASSIFY, "--image-path", str(images), "--output-dir", str(tmp_path / "o"),
                       "--ray", "--gpus-per-worker", "1")
    assert code == 2 and "1 worker of 1 GPU need 1; the cluster has 0" in err


OTHERS = {
    "compare-layers": ["compare-layers", "--layers", "layer3,layer4"],
    "evaluate": ["evaluate", "--method", "gradcam", "--steps", "2"],
    "embed": ["embed", "--method", "gradcam"],
}


@pytest.mark.parametrize("command", OTHERS)
def test_ray_runs_of_the_other_commands_equal_their_plain_runs(cluster: object, tmp_path: Path,
                                                               command: str) -> None:
    paths = distinct_images(tmp_path / "imgs", 3)
    common = [*OTHERS[command], "--arch", "resnet18", "--weights", "none", "--no-cuda", "--input-size", "64",
              "--batch-size", "2", "--json", "--image-path", str(paths[0].parent)]
    if command == "embed":
        common += ["--reference", str(paths[0])]
    plain, spread = tmp_path / "plain", tmp_path / "ray"
    code, out, err = run(*common, "--output-dir", str(plain))
    ray_code, ray_out, ray_err = run(*common, "--output-dir", str(spread), "--ray", "--workers", "2")
    assert (ray_code, code) == (0, 0), (err, ray_err)
    assert ray_out.replace(str(spread), "OUT") == out.replace(str(plain), "OUT")
    assert tree(spread) == tree(plain)
