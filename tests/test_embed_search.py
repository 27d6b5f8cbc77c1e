"""cf-ray embed (the extraction's Ray Data actor pool -> Parquet with clusters), cf-ray index (faiss, a Ray task)
and cf-ray search, on a real local Ray and real JPEGs."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import write_image
from run_helpers import make_run

import cf_ray
from cf_ray.cli import main
from cf_ray.config import IndexConfig
from cf_ray.index import Searcher, choose_kind, make_index, prepare


@pytest.fixture(scope="module")
def setup(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    run, data = make_run(root, "image")
    new = root / "new"
    new.mkdir()
    for i, p in enumerate(sorted(data.glob("*/*.jpg"))[:5]):  # new files: copies and fresh random images
        shutil.copy(p, new / f"copy_{i}.jpg")
    for i in range(3):
        write_image(new / "sub" / f"rand_{i}.png", size=(30, 20), fmt="PNG", seed=i)
    (new / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return run, data, new


def _one_line_error(capsys, args, *words):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    print(err)
    assert err.startswith("error: ") and "\n" not in err and all(w in err for w in words), err


def test_embed_pretrained_with_the_runs_centroids(setup, tmp_path, capsys):
    run, _, new = setup
    out = tmp_path / "emb"
    args = ["embed", "--run-dir", str(run), "--data", str(new), "--out", str(out), "--model", "pretrained"]
    assert main([*args, "extract.batch_size=4", "extract.block_rows=3"]) == 0
    assert "centroids: run" in capsys.readouterr().out
    t = pq.read_table(out)
    assert t.column_names == ["id", "path", "embedding", "cluster", "distance", "error"]
    assert t.num_rows == 9 and len(list(out.glob("part-*.parquet"))) >= 1
    meta = json.loads(t.schema.metadata[b"cf_ray.embed"])
    assert meta["centroids"]["source"] == "run" and meta["centroids"]["built_on"] == "pretrained"
    assert meta["model"] == "pretrained" and meta["layer"] == "res5"
    assert json.loads((out / "_embed.json").read_text())["centroids"]["uri"].endswith("cluster")
    bad = t.filter(pq.read_table(out).column("error").to_numpy(zero_copy_only=False) != "")
    assert (
        bad["id"].to_pylist() == ["broken.jpg"]
        and bad["embedding"].null_count == 1
        and bad["cluster"][0].as_py() is None
    )
    assert "cannot decode image" in pq.read_table(out / "_errors.parquet")["error"][0].as_py()

    good = t.filter(t["error"].to_numpy(zero_copy_only=False) == "").sort_by("id")
    emb = np.stack(good["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    m = cf_ray.load_model(run, which="pretrained")
    want = m.embed(good["path"].to_pylist())
    assert float(np.abs(emb - want).max()) < 1e-5
    cluster, dist = m.assign(want)
    assert good["cluster"].to_pylist() == cluster.tolist()
    np.testing.assert_allclose(good["distance"].to_numpy(), dist, atol=1e-5)

    assert main(args) == 0  # complete: a rerun does nothing
    assert pq.read_table(out).num_rows == 9


def test_embed_clusterfit_with_its_own_centroids(setup, tmp_path, capsys):
    run, _, new = setup
    out = tmp_path / "emb_cf"
    _one_line_error(
        capsys,
        ["embed", "--run-dir", str(run), "--data", str(new), "--out", str(out), "--centroids", "run"],
        "pre-trained model's res5 features",
        "--centroids own",
    )
    assert main(["embed", "--run-dir", str(run), "--data", str(new), "--out", str(out)]) == 0
    meta = json.loads((out / "_embed.json").read_text())
    assert meta["model"] == "clusterfit" and meta["centroids"]["source"] == "own"
    assert meta["centroids"]["built_on"] == "clusterfit" and meta["centroids"]["k"] == 4
    own = run / "own_clusters" / "clusterfit_res5"
    assert (own / "cluster" / "_SUCCESS.json").exists() and (own / "features" / "_SUCCESS.json").exists()
    m = cf_ray.load_model(run)  # now finds its own centroids
    assert m.centroid_info["source"] == "own"
    t = pq.read_table(out).sort_by("id")
    t = t.filter(t["error"].to_numpy(zero_copy_only=False) == "")
    cluster, _ = m.assign(m.embed(t["path"].to_pylist()))
    assert t["cluster"].to_pylist() == cluster.tolist()
    # The own centroids are a k-means of the ClusterFit model's features of the source: assigning those
    # features again gives the clustering stage's own assignments.
    a = pq.read_table(own / "cluster" / "assignments.parquet").sort_by("id")
    src = sorted(run.parent.glob("images/*/*.jpg"))
    got, _ = m.assign(m.embed([str(p) for p in src]))
    assert got.tolist() == a["cluster"].to_pylist()


def test_embed_bad_input(setup, tmp_path, capsys):
    run, _, new = setup
    out = str(tmp_path / "o")
    partial = tmp_path / "partial"
    shutil.copytree(run, partial, ignore=shutil.ignore_patterns("clusterfit", "own_clusters"))
    for args, words in [
        (["--run-dir", str(tmp_path / "none")], ["does not exist"]),
        (["--run-dir", str(partial)], ["no clusterfit model yet", "--model pretrained"]),
        (["--run-dir", str(run), "--layer", "pool5"], ["'pool5'", "res2, res3, res4, res5"]),
        (["--run-dir", str(run), "--centroids", "mine"], ["unknown --centroids 'mine'"]),
        (["--run-dir", str(run), "extract.batch_size=0"], ["batch_size"]),
    ]:
        _one_line_error(capsys, ["embed", "--data", str(new), "--out", out, *args], *words)
    _one_line_error(
        capsys, ["embed", "--run-dir", str(run), "--data", str(tmp_path / "nodata"), "--out", out], "does not exist"
    )


def test_index_and_search(setup, tmp_path, capsys):
    run, data, new = setup
    out = tmp_path / "emb"
    assert main(["embed", "--run-dir", str(run), "--data", str(data), "--out", str(out), "--model", "pretrained"]) == 0
    assert main(["index", "--features", str(out)]) == 0
    assert "index (flat, cosine)" in capsys.readouterr().out
    info = json.loads((out / "_index" / "index.json").read_text())
    assert info["kind"] == "flat" and info["n"] == 12 and info["model"] == "pretrained" and info["run_dir"] == str(run)

    query = sorted(data.glob("*/*.jpg"))[4]
    assert main(["search", "--index", str(out / "_index"), "--query", str(query), "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    print("\n".join(lines))
    assert lines[1] == "rank\tid\tpath\tdistance" and len(lines) == 5
    rank, hit_id, hit_path, dist = lines[2].split("\t")
    assert hit_path == str(query) and abs(float(dist)) < 1e-4  # itself: cosine distance 0

    # IVF over the run's own pre-trained source features (built as a Ray task), all lists probed: exact.
    assert main(["index", "--run-dir", str(run), "--model", "pretrained", "index.kind=ivf", "index.nlist=2"]) == 0
    ivf = Searcher(str(run / "features" / "pretrained" / "source"), nprobe=2)
    flat = Searcher(str(out))
    assert ivf.info["kind"] == "ivf" and ivf.info["nlist"] == 2
    q = cf_ray.load_model(run, which="pretrained").embed([str(query), str(new / "sub" / "rand_0.png")])
    (s1, r1), (s2, r2) = ivf.search(q, 5), flat.search(q, 5)
    assert [[ivf.ids[i] for i in row] for row in r1] == [[flat.ids[i] for i in row] for row in r2]
    np.testing.assert_allclose(s1, s2, atol=1e-5)

    # The run's source embedded by the ClusterFit model (its own_clusters features): the query finds itself.
    assert main(["index", "--run-dir", str(run), "--model", "clusterfit"]) == 0
    own = run / "own_clusters" / "clusterfit_res5" / "features"
    info = json.loads((own / "_index" / "index.json").read_text())
    assert info["model"] == "clusterfit" and info["run_dir"] == str(run) and info["n"] == 12
    capsys.readouterr()
    assert main(["search", "--index", str(own), "--query", str(query), "-k", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[2].split("\t")[2] == str(query)

    _one_line_error(
        capsys,
        ["search", "--index", str(out), "--query", str(new / "broken.jpg")],
        "query",
        "broken.jpg",
        "cannot decode image",
    )
    _one_line_error(capsys, ["search", "--index", str(tmp_path), "--query", str(query)], "no index at")
    _one_line_error(capsys, ["index", "--features", str(tmp_path / "nothing")], "does not exist")
    _one_line_error(capsys, ["index", "--features", str(out), "index.kind=hnsw"], "index.kind")
    _one_line_error(
        capsys,
        ["index", "--features", str(run / "features" / "pretrained" / "source"), "--layer", "res2"],
        "res3, res4, res5",
    )


def test_index_kinds_by_size():
    """auto: flat, then IVF, then IVF-PQ as the row count grows; IVF-PQ still finds most true neighbours."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # OpenMP threads spinning on a loaded 2-core box cost several times more
    try:
        _index_kinds(IndexConfig(flat_max=500, pq_min=2000, pq_m=16, nprobe=8))
    finally:
        faiss.omp_set_num_threads(threads)


def _index_kinds(cfg: IndexConfig) -> None:
    assert [choose_kind(n, cfg) for n in (500, 501, 1999, 2000)] == ["flat", "ivf", "ivf", "ivfpq"]
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 32)).astype(np.float32)
    x = centres[rng.integers(0, 20, 3000)] + 0.3 * rng.normal(size=(3000, 32)).astype(np.float32)
    x = prepare(x, "cosine")
    index, params = make_index(x, cfg)
    exact, _ = make_index(x, IndexConfig(kind="flat"))
    assert params["kind"] == "ivfpq" and params["nlist"] == min(int(4 * 3000**0.5), 3000 // 39)
    _, got = index.search(x[:50], 10)
    _, want = exact.search(x[:50], 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)])
    print(f"IVF-PQ recall@10 on 3000 x 32: {recall:.2f}")
    assert recall > 0.6
