import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import write_image

from cf_ray.sources import SourceError, list_items, load_target, split_items


def test_folder_with_class_subfolders(tmp_path):
    for c in ("a", "b"):
        for i in range(3):
            write_image(tmp_path / c / f"{i}.jpg", seed=i)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "b" / ".DS_Store").write_bytes(b"x")
    items, skipped = list_items(str(tmp_path))
    assert items.num_rows == 6
    assert sorted(set(items["label"].to_pylist())) == ["a", "b"]
    assert items["id"].to_pylist()[0] == "a/0.jpg"
    assert skipped["id"].to_pylist() == ["a/notes.txt"]
    assert "unsupported file type" in skipped["error"][0].as_py()


def test_flat_folder_has_no_labels(tmp_path):
    write_image(tmp_path / "x.png", fmt="PNG")
    items, _ = list_items(str(tmp_path))
    assert items["label"].to_pylist() == [None]


def test_manifest_csv_and_parquet(tmp_path):
    write_image(tmp_path / "img" / "1.jpg")
    write_image(tmp_path / "img" / "2.jpg")
    (tmp_path / "m.csv").write_text("path,label\nimg/1.jpg,cat\nimg/2.jpg,dog\n")
    items, _ = list_items(str(tmp_path / "m.csv"))
    assert items["label"].to_pylist() == ["cat", "dog"]
    assert items["path"][0].as_py() == str(tmp_path / "img" / "1.jpg")
    pq.write_table(
        pa.table({"id": ["u", "v"], "path": [str(tmp_path / "img" / "1.jpg"), "img/2.jpg"]}), tmp_path / "m.parquet"
    )
    items, _ = list_items(str(tmp_path / "m.parquet"))
    assert items["id"].to_pylist() == ["u", "v"]


def test_manifest_errors(tmp_path):
    (tmp_path / "dup.csv").write_text("id,path\n1,a.jpg\n1,b.jpg\n")
    with pytest.raises(SourceError, match="duplicate ids"):
        list_items(str(tmp_path / "dup.csv"))
    (tmp_path / "nopath.csv").write_text("file\na.jpg\n")
    with pytest.raises(SourceError, match="'path' column"):
        list_items(str(tmp_path / "nopath.csv"))


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        list_items(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no usable files"):
        list_items(str(tmp_path / "empty"))
    with pytest.raises(SourceError, match="no data path"):
        list_items("")


def test_split_is_deterministic_and_disjoint():
    items = pa.table({"id": [f"c/{i}" for i in range(1000)], "path": ["p"] * 1000, "label": ["c"] * 1000})
    tr1, te1 = split_items(items, 0.3, seed=0)
    tr2, te2 = split_items(items, 0.3, seed=0)
    assert te1["id"].to_pylist() == te2["id"].to_pylist()
    assert not set(tr1["id"].to_pylist()) & set(te1["id"].to_pylist())
    assert 250 < te1.num_rows < 350


def test_target_needs_labels(tmp_path):
    for i in range(4):
        write_image(tmp_path / f"{i}.jpg")
    with pytest.raises(SourceError, match="no labels"):
        load_target(str(tmp_path), 0.5, 0)
