"""index.html: every image of an output folder on one static page, kept up to date by the runner.

The page lists what the folder holds, whoever wrote it: a row per ``<image>/<task>`` folder, from
its ``error.json`` (the latest attempt at that image failed) or else its ``summary.json``. So
shards writing into one folder and ``--skip-existing`` resumes are covered by construction: a
run starts from the folder's records, updates its own rows as images finish, and its last write
reads the folder again under a lock, so the run that finishes last writes a page of every image
any run finished. Links are relative (the folder can move); thumbnails are the map PNGs themselves,
scaled and loaded lazily by the browser, so the page costs no image writes. Everything shown is
escaped, and names that are not UTF-8 are shown with their bytes as ``\\xNN``.

The page is rewritten on a time budget (at least ``GAP`` seconds apart, and at most ``SHARE`` of
the run's time), not after every image, so a run of n images costs O(n) page writing.
"""

from __future__ import annotations

import fcntl
import html
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote

from ..errors import GradcamError
from ..io import atomic_write, image_id, json_bytes

PAGE = "index.html"
ERROR = "error.json"    # beside summary.json: the latest attempt at this image failed
SUMMARY = "summary.json"
GAP = 1.0               # seconds: the least time between two writes of the page during a run
SHARE = 0.05            # the most of a run's time that rewriting the page may take
THUMB = 56              # pixels: a map's thumbnail


class Report:
    """The output folder's ``index.html``, updated as a run's records come in."""

    def __init__(self, out: Path, tag: str) -> None:
        """Start from the records already in ``out``; ``tag`` is the run's task folder name."""
        self.out, self.tag = out, tag
        self.rows = {key: row(key, record) for key, record in read_records(out).items()}
        self.added = False
        self.cost, self.last = 0.0, -math.inf

    def add(self, record: dict) -> None:
        """Note a finished image (its error file kept or removed) and rewrite the page when due."""
        key = self.key(record)
        if record["status"] == "error":
            atomic_write(self.out / key / ERROR, json_bytes(record))
        else:
            (self.out / key / ERROR).unlink(missing_ok=True)
        self.rows[key] = row(key, record)
        self.added = True
        if time.monotonic() - self.last >= max(GAP, self.cost / SHARE):
            self.write()

    def key(self, record: dict) -> str:
        """The record's ``<image>/<task>`` folder, relative to the output folder."""
        if "summary" in record:
            return "/".join(Path(record["summary"]).parts[-3:-1])
        return f"{image_id(record['image'])}/{self.tag}"

    def write(self) -> None:
        """Write the page from the rows known now, atomically, timing it for the budget."""
        began = time.monotonic()
        atomic_write(self.out / PAGE, page(self.rows).encode())
        self.last = time.monotonic()
        self.cost = self.last - began

    def finish(self) -> None:
        """The run's last write, from the folder as it is now (other shards' records too), under
        a lock so that the page of the run that finishes last is not overwritten by an older one;
        nothing when this run reported no image."""
        if not self.added:
            return
        with locked(self.out):
            self.rows = {key: row(key, record) for key, record in read_records(self.out).items()}
            self.write()


def reported(records: Iterator[dict], out: Path, tag: str) -> Iterator[dict]:
    """``records`` as they come, each put on ``out``'s page after it is yielded; the page is
    written once more at the end, also when the run stops on an error (which goes on)."""
    report = Report(out, tag)
    try:
        for record in records:
            yield record
            report.add(record)
    except BaseException:
        _quietly(report.finish)
        raise
    report.finish()


def _quietly(write: Callable[[], None]) -> None:
    """Write, leaving an output error unsaid (another error is under way)."""
    try:
        write()
    except GradcamError:
        pass


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` itself (no lock file left behind)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_records(out: Path) -> dict[str, dict]:
    """Every ``<image>/<task>`` folder's record: its error file, else its summary (paths as
    strings: pathlib would double the time for 5,000 folders)."""
    records = {}
    for image in _folders(str(out)):
        for task in _folders(image.path):
            record = _load(os.path.join(task.path, ERROR)) or _load(os.path.join(task.path, SUMMARY))
            if record is not None:
                records[f"{image.name}/{task.name}"] = record
    return records


def _folders(path: str) -> list[os.DirEntry]:
    """The sub-folders of ``path``, in name order."""
    with os.scandir(path) as entries:
        return sorted((e for e in entries if e.is_dir(follow_symlinks=False)), key=lambda e: e.name)


def _load(path: str) -> dict | None:
    """A record file's content; None when it is missing or not a record."""
    try:
        with open(path, "rb") as f:
            record = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "image" in record else None


def shown(text: object) -> str:
    """Text as the page can carry it: a name's undecodable bytes (surrogates) as ``\\xNN``."""
    text = str(text)
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def esc(text: object) -> str:
    """Text shown, HTML-escaped for an element or a quoted attribute."""
    return html.escape(shown(text), quote=True)


def link(key: str, folder: str, path: str) -> str | None:
    """A file in the record's ``folder`` (with a trailing separator) as a relative URL from the
    page; None for a file outside it. Plain string work: pathlib is slow for 5,000 x 15 maps."""
    if not path.startswith(folder):
        return None
    return quote(f"{key}/{path[len(folder):].replace(os.sep, '/')}", safe="/")


def _folder(record: dict) -> str:
    """The folder the record's files were written in, as they are spelled in it."""
    return os.path.join(os.path.dirname(record.get("summary", "")), "")


def _maps(maps: dict, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(label, path) of each map, nested by layer (compare-layers) or not."""
    for name, value in maps.items():
        if isinstance(value, dict):
            yield from _maps(value, f"{prefix}{name} / ")
        else:
            yield f"{prefix}{name}", value


def _thumb(url: str, label: str) -> str:
    """A map's thumbnail linking to the full-size file."""
    url, label = esc(url), esc(label)
    return (f'<a href="{url}"><img src="{url}" alt="{label}" title="{label}" '
            f'loading="lazy" width="{THUMB}" height="{THUMB}"></a>')


def _score(entry: dict) -> tuple[str, float | None]:
    """A class's number and its label: p (softmax, sigmoid), logit, or s (similarity)."""
    if "similarity" in entry:
        return "s", entry["similarity"]
    return ("logit" if entry.get("score_kind") == "logit" else "p"), entry.get("score")


def _class_line(key: str, folder: str, entry: dict) -> str:
    """One explained class: rank, name, score and its maps' thumbnails."""
    label, value = _score(entry)
    number = "" if value is None else f" <span class=num>{label} {value:.3f}</span>"
    thumbs = "".join(_thumb(url, name) for name, path in _maps(entry.get("maps", {}))
                     if (url := link(key, folder, path)))
    name = esc(entry.get("name", ""))
    return f'<li><span class=cls title="{name}">{name}</span>{number} {thumbs}</li>'


class Row(NamedTuple):
    """One image's table row, with what the page's counts and class filter need of it."""

    html: str
    classes: list[str]
    failed: bool


def _name(image: str) -> str:
    """An image's file name, with its folder below it in small type."""
    folder, name = os.path.split(shown(image))
    return f"<b>{html.escape(name)}</b><br><span class=dir>{html.escape(folder)}</span>"


FILES = (("grid", "grid"), ("video", "clip"), ("frames_file", "frames"), ("curves", "curves"),
         ("sanity_plot", "sanity"), ("summary", "record"))


def row(key: str, record: dict) -> Row:
    """The table row of one image: name, task, classes with maps, files; or its failure."""
    failed = record.get("status") == "error"
    classes = [] if failed else record.get("classes") or record.get("detections", [])  # detect's rows
    top = classes[0] if classes else {}
    value = _score(top)[1] if top else None
    names = [shown(c.get("name", "")) for c in classes]
    if failed:
        body = f'<td colspan=2 class=error>{esc(record.get("error", "failed"))}</td>'
    else:
        folder = _folder(record)
        lines = "".join(_class_line(key, folder, c) for c in classes)
        files = " ".join(f'<a href="{esc(url)}">{text}</a>' for field, text in FILES
                         if field in record and (url := link(key, folder, record[field])))
        body = f"<td><ol>{lines}</ol></td><td>{files}</td>"
    task = key.split("/", 1)[1]
    return Row(f'<tr data-key="{esc(key)}" data-image="{esc(record["image"])}" '
               f'data-status="{"error" if failed else "ok"}" data-class="{esc(top.get("name", ""))}" '
               f'data-p="{"" if value is None else repr(float(value))}" '
               f'data-classes="{esc(json.dumps(names, ensure_ascii=False))}">'
               f'<td class=name title="{esc(record["image"])}">{_name(record["image"])}</td>'
               f'<td>{esc(task)}</td>{body}</tr>\n', names, failed)


def page(rows: dict[str, Row]) -> str:
    """The whole page: counts, the class filter, the rows in key order, the inline script."""
    ordered = [rows[k] for k in sorted(rows)]
    failed = sum(r.failed for r in ordered)
    classes: dict[str, int] = {}
    for r in ordered:
        for name in r.classes:
            classes[name] = classes.get(name, 0) + 1
    options = "".join(f'<option value="{esc(n)}">{esc(n)} ({c})</option>' for n, c in sorted(classes.items()))
    return TEMPLATE.format(count=len(ordered), ok=len(ordered) - failed, failed=failed, options=options,
                           rows="".join(r.html for r in ordered), thumb=THUMB)


TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>gradcam: {count} images</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1em; color: #222; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }}
th button {{ font: inherit; font-weight: bold; border: 0; background: none; cursor: pointer; padding: 0; }}
button[data-order=ascending]::after {{ content: " \\25B2"; }}
button[data-order=descending]::after {{ content: " \\25BC"; }}
td.name {{ word-break: break-all; max-width: 24em; }}
td.error {{ color: #a00; }}
ol {{ margin: 0; padding-left: 1.4em; }}
li {{ margin: 2px 0; }}
.cls {{ display: inline-block; width: 14em; overflow: hidden; text-overflow: ellipsis; white-space: nowrap;
        vertical-align: middle; }}
.num {{ display: inline-block; width: 6em; color: #555; }}
.dir {{ color: #777; font-size: 85%; }}
img {{ width: {thumb}px; height: {thumb}px; object-fit: cover; vertical-align: middle; margin-right: 2px;
       image-rendering: auto; background: #eee; }}
#controls {{ margin: 0.5em 0 1em; }}
</style></head>
<body>
<h1>gradcam</h1>
<p>{count} images: {ok} explained, {failed} failed. <span id="shown"></span></p>
<div id="controls">
<label>class <select id="class"><option value="">all classes</option>{options}</select></label>
<label><input type="checkbox" id="failed"> failures only</label>
</div>
<table>
<thead><tr><th><button data-sort="name" data-order="ascending">image</button></th><th>model@layer</th>
<th><button data-sort="class">class</button> / <button data-sort="p">probability</button> and maps</th>
<th>files</th></tr></thead>
<tbody id="rows">
{rows}</tbody></table>
<script>
(() => {{
  const body = document.getElementById("rows"), rows = [...body.rows];
  const pick = document.getElementById("class"), failed = document.getElementById("failed");
  const keys = {{ name: r => r.dataset.image, class: r => r.dataset.class, p: r => r.dataset.p }};
  const cmp = (x, y) => (x < y ? -1 : x > y ? 1 : 0);
  const state = () => new URLSearchParams(location.hash.slice(1));
  function go(change) {{
    const s = state();
    for (const [k, v] of Object.entries(change)) {{ if (v) s.set(k, v); else s.delete(k); }}
    location.hash = s.toString();
    apply();
  }}
  function order(sort, desc) {{
    return (a, b) => {{
      const x = keys[sort](a), y = keys[sort](b);
      const byName = cmp(a.dataset.image, b.dataset.image) || cmp(a.dataset.key, b.dataset.key);
      if (x === "" || y === "") return (x === "") - (y === "") || byName;
      const d = sort === "p" ? parseFloat(x) - parseFloat(y) : cmp(x, y);
      return (desc ? -d : d) || byName;
    }};
  }}
  function apply() {{
    const s = state(), sort = keys[s.get("sort")] ? s.get("sort") : "name";
    const desc = s.get("order") === "desc", cls = s.get("class") || "", onlyFailed = s.get("failed") === "1";
    rows.sort(order(sort, desc));
    body.append(...rows);
    let n = 0;
    for (const r of rows) {{
      r.hidden = (cls !== "" && !JSON.parse(r.dataset.classes).includes(cls)) ||
                 (onlyFailed && r.dataset.status !== "error");
      n += r.hidden ? 0 : 1;
    }}
    pick.value = cls;
    failed.checked = onlyFailed;
    for (const b of document.querySelectorAll("button[data-sort]")) {{
      b.dataset.order = b.dataset.sort === sort ? (desc ? "descending" : "ascending") : "";
    }}
    document.getElementById("shown").textContent = n + " shown.";
  }}
  for (const b of document.querySelectorAll("button[data-sort]")) {{
    b.addEventListener("click", () => {{
      const s = state(), again = (s.get("sort") || "name") === b.dataset.sort && s.get("order") !== "desc";
      go({{ sort: b.dataset.sort, order: again ? "desc" : "" }});
    }});
  }}
  pick.addEventListener("change", () => go({{ class: pick.value }}));
  failed.addEventListener("change", () => go({{ failed: failed.checked ? "1" : "" }}));
  window.addEventListener("hashchange", apply);
  apply();
}})();
</script>
</body></html>
"""
