"""Finding the images of a run: folders, globs, lists, sharding."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from gradcam_cli import UsageError
from gradcam_cli.errors import ArgumentError
from gradcam_cli.inputs import BadInput, expand, parse_shard, read_image_list, shard


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for name in ("b/2.png", "b/1.JPG", "a.jpg", "notes.txt", "c/deep/3.webp", "empty/.keep"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return tmp_path


def test_folder_is_searched_recursively_in_sorted_order_skipping_non_images(tree: Path) -> None:
    found = expand([str(tree)])
    assert [p.relative_to(tree).as_posix() for p in found] == ["a.jpg", "b/1.JPG", "b/2.png", "c/deep/3.webp"]


def test_globs_and_explicit_files(tree: Path) -> None:
    assert expand([str(tree / "b" / "*.png")]) == [tree / "b" / "2.png"]
    assert expand([str(tree / "**" / "*.webp")]) == [tree / "c" / "deep" / "3.webp"]
    assert expand([str(tree / "notes.txt")]) == [tree / "notes.txt"]  # explicit: fails on decode


def test_paths_yielding_nothing_become_errors(tree: Path) -> None:
    found = expand([str(tree / "empty"), str(tree / "*.gif")])
    assert all(isinstance(f, BadInput) for f in found)
    assert "no images in this folder" in found[0].reason and "no file matches" in found[1].reason


def test_image_list_from_file_and_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg\n\n  b.png \n")
    assert read_image_list(str(listing)) == ["a.jpg", "b.png"]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"c.jpg\n")))
    assert read_image_list("-") == ["c.jpg"]
    with pytest.raises(UsageError, match="image_list="):
        read_image_list(str(tmp_path / "missing.txt"))


def test_shards_are_disjoint_and_cover_everything() -> None:
    items = list(range(23))
    parts = [shard(items, parse_shard(f"{i}/4")) for i in range(1, 5)]
    assert sorted(x for part in parts for x in part) == items
    assert sum(len(p) for p in parts) == len(items)
    assert shard(items, None) == items


@pytest.mark.parametrize("text", ["0/4", "5/4", "1-4", "a/b", "3"])
def test_bad_shard_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="shard="):
        parse_shard(text)


def test_bad_image_list_and_shard_name_their_python_argument(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(ArgumentError, match="cannot read") as error:
        read_image_list(missing)
    assert (error.value.argument, error.value.value) == ("image_list", missing)
    with pytest.raises(ArgumentError, match="1 <= I <= N") as error:
        parse_shard("5/4")
    assert (error.value.argument, error.value.value) == ("shard", "5/4")


def test_reasons_quote_odd_names_on_one_line(tmp_path: Path) -> None:
    odd = tmp_path / "new\nfolder"
    odd.mkdir()
    folder, pattern = expand([str(odd), str(tmp_path / "x\ny*.png")])
    for item, words in ((folder, "new\\nfolder': no images"), (pattern, "x\\ny*.png': no file matches")):
        assert isinstance(item, BadInput) and "\n" not in item.reason and words in item.reason


def test_image_list_keeps_names_that_are_not_utf8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / os.fsdecode(b"x_\xff.jpg")
    image.write_bytes(b"x")
    listing = tmp_path / "list.txt"
    listing.write_bytes(bytes(image) + b"\n")
    assert read_image_list(str(listing)) == [str(image)] and Path(str(image)).is_file()
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"a_\xfe.png\n")))
    assert read_image_list("-") == [os.fsdecode(b"a_\xfe.png")]
