"""index.html: rows from every record in the output folder, escaped, relative links, and the
page driven in a real headless Chromium over the DevTools protocol (``--remote-debugging-pipe``)."""

from __future__ import annotations

import fcntl
import html.parser
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
from torch import nn

from gradcam_cli import classify, evaluate
from gradcam_cli.models import LoadedModel
from gradcam_cli.outputs import report
from gradcam_cli.preprocess import Preprocess

from .conftest import make_image

CLASSES = ["<b>cat</b>", "dog & fox", 'say "hi"', "it's"]
NAMES = ["a<1>.png", "b&amp.png", 'c"q\'.png', "d.png", "e.png", "f.png"]


def tiny_model() -> LoadedModel:
    """A random-weight convolutional network of four classes whose names need escaping."""
    torch.manual_seed(3)
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                           nn.Flatten(), nn.Linear(4, 4)).eval()
    return LoadedModel("tiny", module, CLASSES, Preprocess((16, 16), (0.5,) * 3, (0.5,) * 3), "none")


def images(folder: Path, names: list[str]) -> list[Path]:
    """Distinct small images (each a different size, so each gets its own scores)."""
    return [make_image(folder / n, size=(20 + 7 * i, 18 + 3 * i)) for i, n in enumerate(names)]


def run_tiny(inputs: list[Path], out: Path, **options: object) -> list[dict]:
    """classify with the tiny model: top-2, two maps per class."""
    return list(classify(tiny_model(), inputs, out, layer="0", topk=2, methods=["vanilla", "gradcam"],
                         batch_size=2, **options))


class Rows(html.parser.HTMLParser):
    """The report's table rows (their data- attributes and text) and every href and src."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.links: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "tr" and "data-key" in found:
            self.rows.append({**found, "text": ""})
        self.links += [value for name, value in attrs if name in ("href", "src") and value]

    def handle_data(self, data: str) -> None:
        if self.rows:
            self.rows[-1]["text"] += data


def test_every_record_is_a_row_escaped_with_relative_links(tmp_path: Path) -> None:
    inputs = images(tmp_path / "in", NAMES[:3])
    missing = tmp_path / "in" / "gone <x>.png"
    records = run_tiny([*inputs, missing], tmp_path / "out")
    text = (tmp_path / "out" / "index.html").read_text()
    assert "<b>cat" not in text and "<1>" not in text  # escaped, never markup
    page = Rows(text)
    by_image = {row["data-image"]: row for row in page.rows}
    assert set(by_image) == {str(p) for p in [*inputs, missing]}
    for record in records[:3]:
        row = by_image[record["image"]]
        top = record["classes"][0]
        assert row["data-class"] == top["name"] and float(row["data-p"]) == top["score"]
        assert json.loads(row["data-classes"]) == [c["name"] for c in record["classes"]]
    failed = by_image[str(missing)]
    assert failed["data-status"] == "error" and records[3]["error"] in failed["text"]
    expected = {os.path.relpath(f, tmp_path / "out") for r in records[:3]
                for f in [r["grid"], r["summary"], *(m for c in r["classes"] for m in c["maps"].values())]}
    assert {unquote(link) for link in page.links} == expected  # relative: the folder can move


def test_non_utf8_names_are_shown_with_their_bytes(tmp_path: Path) -> None:
    (image,) = images(tmp_path / "in", ["x.png"])
    odd = image.with_name(os.fsdecode(b"odd_\xff<.png"))
    image.rename(odd)
    run_tiny([odd], tmp_path / "out")
    text = (tmp_path / "out" / "index.html").read_bytes().decode("utf-8")  # valid UTF-8
    assert "odd_\\xff&lt;.png" in text


def test_report_covers_shards_resumes_and_earlier_failures(tmp_path: Path) -> None:
    """Two shards into one folder: the page lists both; a failure stays listed until that
    image succeeds; a resumed image is listed from its earlier record."""
    inputs = images(tmp_path / "in", NAMES[3:])
    broken = tmp_path / "in" / "broken.png"
    broken.write_bytes(b"not a png")
    out = tmp_path / "out"
    run_tiny([inputs[0], broken], out)
    run_tiny([inputs[1], inputs[2]], out)
    rows = {r["data-image"]: r["data-status"] for r in Rows((out / "index.html").read_text()).rows}
    assert rows == {str(inputs[0]): "ok", str(broken): "error", str(inputs[1]): "ok", str(inputs[2]): "ok"}
    make_image(broken)
    assert [r["status"] for r in run_tiny([inputs[0], broken], out, skip_existing=True)] == ["skipped", "ok"]
    rows = {r["data-image"]: r["data-status"] for r in Rows((out / "index.html").read_text()).rows}
    assert set(rows.values()) == {"ok"} and len(rows) == 4


def test_the_shard_that_finishes_last_lists_every_shards_images(tmp_path: Path) -> None:
    inputs, out = images(tmp_path / "in", NAMES), tmp_path / "out"
    first = classify(tiny_model(), inputs[:4], out, layer="0", topk=1, methods=["gradcam"], batch_size=2)
    next(first)  # shard 1 under way, its page started from an empty folder
    run_tiny(inputs[4:], out)  # shard 2 runs whole meanwhile
    list(first)
    rows = Rows((out / "index.html").read_text()).rows
    assert sorted(row["data-image"] for row in rows) == sorted(map(str, inputs))


def test_same_run_same_bytes_and_no_page_without_records(tmp_path: Path) -> None:
    inputs = images(tmp_path / "in", NAMES[:2])
    run_tiny(inputs, tmp_path / "a")
    run_tiny(inputs, tmp_path / "b")
    assert (tmp_path / "a" / "index.html").read_bytes() == (tmp_path / "b" / "index.html").read_bytes()
    assert run_tiny([], tmp_path / "c") == [] and not (tmp_path / "c" / "index.html").exists()


def test_evaluate_rows_link_their_curves(tmp_path: Path) -> None:
    inputs = images(tmp_path / "in", NAMES[3:5])
    records = list(evaluate(tiny_model(), inputs, tmp_path / "out", layer="0", topk=2, methods=["gradcam"],
                            steps=3))
    page = Rows((tmp_path / "out" / "index.html").read_text())
    assert [row["data-image"] for row in page.rows] == [r["image"] for r in records]
    for row, record in zip(page.rows, records, strict=True):
        assert json.loads(row["data-classes"]) == [c["name"] for c in record["classes"]]
    expected = {os.path.relpath(f, tmp_path / "out") for r in records for f in (r["curves"], r["summary"])}
    assert {unquote(link) for link in page.links} == expected


def fake_record(i: int, out: Path) -> dict:
    """A classify record as ``pipeline.Job.write`` makes it: 3 classes of 5 maps."""
    folder = out / f"img{i:05d}-0123abcd" / "resnet18@layer4"
    classes = [{"rank": k + 1, "class_id": 10 * k + i % 7, "name": f"class {k + i % 7}",
                "score": 0.5 / (k + 1), "score_kind": "softmax", "probability": 0.5 / (k + 1),
                "maps": {m: str(folder / f"r{k + 1}-c{k}" / f"{m}.png")
                         for m in ("vanilla", "guided", "deconv", "gradcam", "guided-gradcam")}}
               for k in range(3)]
    return {"image": f"/data/img{i:05d}.jpg", "status": "ok", "classes": classes,
            "grid": str(folder / "grid.png"), "summary": str(folder / "summary.json")}


def test_5000_records_are_written_a_few_times_not_once_per_image(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The page is rewritten on a time budget, so 5,000 records cost a few writes (O(n)), and
    one write of 5,000 rows takes well under a second."""
    writes: list[float] = []
    real = report.Report.write

    def timed(self: report.Report) -> None:
        began = time.perf_counter()
        real(self)
        writes.append(time.perf_counter() - began)
    monkeypatch.setattr(report.Report, "write", timed)
    page = report.Report(tmp_path, "resnet18@layer4")
    began = time.perf_counter()
    for i in range(5000):
        page.add(fake_record(i, tmp_path))
    page.write()
    total = time.perf_counter() - began
    rows = (tmp_path / "index.html").read_text().count("<tr data-key=")
    print(f"5000 records: {len(writes)} writes, last {writes[-1]:.3f} s, all {total:.3f} s, "
          f"{(tmp_path / 'index.html').stat().st_size / 1e6:.1f} MB")
    assert rows == 5000 and len(writes) <= 5 and writes[-1] < 1.0


# --- the page in a real browser -------------------------------------------------------------

def chromium() -> str:
    """Chromium's path; skipped when it is missing, except in CI, where that is a failure."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("Chromium is missing: CI must install it (.ci/run: apt-get install chromium)")
    pytest.skip("Chromium is not installed (apt-get install chromium); the browser test needs it")


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe: NUL-separated JSON
    messages on file descriptors 3 (to the browser) and 4 (from it)."""

    def __init__(self, executable: str) -> None:
        to_browser, self._in = os.pipe()
        self._out, from_browser = os.pipe()
        self.profile = tempfile.mkdtemp(prefix="gradcam-chromium-")

        def fds() -> None:  # in the child: the pipe's ends as 3 and 4, whatever numbers they had
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)
        self.process = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             "--no-first-run", f"--user-data-dir={self.profile}", "--window-size=1200,900", "about:blank"],
            preexec_fn=fds, pass_fds=(3, 4), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._next, self.events = b"", 0, []
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        attached = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)
        self.session = attached["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable", session=True)

    def call(self, method: str, session: bool = False, **params: object) -> dict:
        """Send one command and return its result, keeping the events that arrive meanwhile."""
        self._next += 1
        message = {"id": self._next, "method": method, "params": params,
                   **({"sessionId": self.session} if session else {})}
        os.write(self._in, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next:
                assert "error" not in reply, reply
                return reply["result"]
            self.events.append(reply)

    def _read(self) -> dict:
        """The next message from the browser (within 30 s)."""
        deadline = time.monotonic() + 30
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._out], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, "Chromium stopped answering"
            chunk = os.read(self._out, 1 << 16)
            assert chunk, "Chromium closed the pipe"
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url: str) -> None:
        """Load ``url`` afresh (by way of a blank page: a new fragment alone loads nothing) and
        wait for its load event."""
        for address in ("about:blank", url):
            self.events.clear()
            self.call("Page.navigate", session=True, url=address)
            while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
                self.events.append(self._read())

    def js(self, expression: str) -> object:
        """Evaluate in the page; the value, returned by value."""
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                           awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def errors(self) -> list[dict]:
        """Console errors, uncaught exceptions and failed loads seen so far."""
        self.js("new Promise(r => setTimeout(r, 50))")  # let late events arrive
        return [e for e in self.events
                if e.get("method") == "Runtime.exceptionThrown"
                or (e.get("method") == "Runtime.consoleAPICalled"
                    and e["params"]["type"] in ("error", "assert"))
                or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]

    def close(self) -> None:
        """End the browser and remove its profile."""
        self.process.kill()
        self.process.wait()
        os.close(self._in)
        os.close(self._out)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Browser:
    started = Browser(chromium())
    yield started
    started.close()


VISIBLE = "[...document.querySelectorAll('tr[data-key]')].filter(r => !r.hidden).map(r => r.dataset.image)"


def test_page_sorts_filters_and_links_in_chromium(tmp_path: Path, browser: Browser) -> None:
    inputs = images(tmp_path / "in", NAMES)
    broken = tmp_path / "in" / "broken <&>.png"
    broken.write_bytes(b"\x89PNG broken")
    records = run_tiny([*inputs, broken], tmp_path / "run")
    moved = tmp_path / "moved here"  # relative links: the folder can move, and names need quoting
    (tmp_path / "run").rename(moved)
    browser.open((moved / "index.html").as_uri())
    assert browser.errors() == []
    ok = [r for r in records if r["status"] == "ok"]
    by_name = sorted(r["image"] for r in records)
    assert browser.js(VISIBLE) == by_name  # by name at first

    browser.js("document.querySelector('button[data-sort=p]').click()")
    by_p = sorted(ok, key=lambda r: r["classes"][0]["score"])
    assert browser.js(VISIBLE) == [r["image"] for r in by_p] + [str(broken)]  # failures last
    browser.js("document.querySelector('button[data-sort=p]').click()")  # again: descending
    assert browser.js(VISIBLE) == [r["image"] for r in by_p[::-1]] + [str(broken)]

    browser.js("document.querySelector('button[data-sort=class]').click()")
    classes = browser.js("[...document.querySelectorAll('tr[data-key]')].map(r => r.dataset.class)")
    named = [c for c in classes if c]
    assert named == sorted(named) and len(named) == len(ok)

    chosen = ok[0]["classes"][1]["name"]  # a class in some rows, at any rank
    browser.js(f"const s = document.getElementById('class'); s.value = {json.dumps(chosen)};"
               "s.dispatchEvent(new Event('change'))")
    wanted = {r["image"] for r in ok if chosen in [c["name"] for c in r["classes"]]}
    assert set(browser.js(VISIBLE)) == wanted and 0 < len(wanted)
    assert browser.js("location.hash").startswith("#")  # the view is in the address: shareable

    browser.open((moved / "index.html").as_uri() + "#failed=1")
    assert browser.js(VISIBLE) == [str(broken)]
    reason = browser.js("document.querySelector('tr[data-status=error]').textContent")
    assert records[-1]["error"] in reason
    assert browser.errors() == []

    links = browser.js("[...document.querySelectorAll('[href], [src]')].map(e => e.href || e.src)")
    files = [Path(unquote(urlsplit(link).path)) for link in links if link.startswith("file:")]
    assert len(files) == len(ok) * (2 + 2 * 2 * 2)  # grid and record; 2 classes x 2 maps, as href and src
    assert all(f.is_file() and f.is_relative_to(moved) for f in files)
    assert browser.js("[...document.images].filter(i => i.complete && i.naturalWidth === 0).length") == 0
