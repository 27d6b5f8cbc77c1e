import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import write_image

from cf_ray.sources import SourceError, list_items, load_target, split_items, target_splits


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


def _labelled(root, splits, per_class=2):
    """root/<split>/<class>/<n>.jpg for each split: real JPEGs in the given layout."""
    for s in splits:
        for c in ("cat", "dog"):
            for i in range(per_class):
                write_image(root / s / c / f"{s}_{c}_{i}.jpg", size=(8, 8), seed=i)
    return str(root)


@pytest.mark.parametrize("held", ["test", "val", "validation"])
def test_target_with_train_and_a_held_out_folder(tmp_path, caplog, held):
    """The ImageNet convention (train/ + val/) is read like train/ + test/, and the log says which was used."""
    target = _labelled(tmp_path, ["train", held])
    with caplog.at_level("INFO", logger="cf_ray.sources"):
        train, test, skipped = load_target(target, 0.5, 0)
    split_of = lambda t: {p.rsplit("/", 1)[1].split("_")[0] for p in t["path"].to_pylist()}  # noqa: E731
    assert split_of(train) == {"train"} and split_of(test) == {held}
    assert sorted(set(test["label"].to_pylist())) == ["cat", "dog"] and train.num_rows == test.num_rows == 4
    note = target_splits(target).note
    assert note.startswith(f"train/ and {held}/") and note in caplog.text
    assert ("used as the test split" in note) == (held != "test")


def test_target_with_both_val_and_test_needs_a_choice(tmp_path):
    target = _labelled(tmp_path, ["train", "val", "test"])
    with pytest.raises(SourceError, match=r"has test/ and val/ next to train/; pick .*probe.test_split=test\|val"):
        load_target(target, 0.5, 0)
    train, test, _ = load_target(target, 0.5, 0, test_split="val")
    assert all("/val/" in p for p in test["path"].to_pylist()) and all(
        "/train/" in p for p in train["path"].to_pylist()
    )
    assert "picked by probe.test_split" in target_splits(target, "val").note
    with pytest.raises(
        SourceError, match=r"test_split=validation \(probe.test_split or .* needs folders train/ and valid"
    ):
        load_target(target, 0.5, 0, test_split="validation")


def test_target_split_layouts_without_a_pair(tmp_path):
    # train/ alone: its items are split (before: the whole folder was one class named 'train').
    only_train = _labelled(tmp_path / "a", ["train"], per_class=6)
    train, test, _ = load_target(only_train, 0.5, 0)
    assert set(train["label"].to_pylist() + test["label"].to_pylist()) == {"cat", "dog"}
    assert train.num_rows + test.num_rows == 12 and "train/ only" in target_splits(only_train).note
    # a held-out folder without train/ is refused, naming what is missing
    with pytest.raises(SourceError, match="has val/ but no train/"):
        load_target(_labelled(tmp_path / "b", ["val"]), 0.5, 0)
    # one labelled folder of class folders: split by test_fraction, as before
    flat = tmp_path / "c"
    for c in ("cat", "dog"):
        for i in range(6):
            write_image(flat / c / f"{i}.jpg", size=(8, 8), seed=i)
    train, test, _ = load_target(str(flat), 0.5, 0)
    assert train.num_rows + test.num_rows == 12 and "one labelled set" in target_splits(str(flat)).note


def test_test_split_setting_per_target():
    from cf_ray.config import JobConfig, load_config

    cfg = load_config(
        JobConfig, None, ["target=a", "targets.b.path=b", "targets.b.test_split=val", "probe.test_split=test"]
    )
    assert {n: t.test_split for n, t in cfg.transfer_targets().items()} == {"target": "test", "b": "val"}
