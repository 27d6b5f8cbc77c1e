"""`cf-ray export | embed | index | search`: a finished run's models in use (README: "Use the ClusterFit model")."""

from __future__ import annotations

import argparse
import sys

from cf_ray import log

COMMANDS = ("export", "embed", "index", "search")


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Use a finished run's models: export, embed, index, search.")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="write a model as torch.export (.pt2) or ONNX, with a model card")
    e.add_argument("--run-dir", required=True, help="the run directory (path or URI)")
    e.add_argument("--format", default="torch_export", help="torch_export (default) or onnx")
    e.add_argument("--model", default="clusterfit", help="clusterfit (default), pretrained or random")
    e.add_argument("--layers", default="", help="comma-separated taps to output (default: all)")
    e.add_argument("--out", help="output folder (default <run>/export/<model>_<format>)")

    m = sub.add_parser("embed", help="embed new images or videos with the run's model into Parquet (Ray Data)")
    m.add_argument("--run-dir", required=True)
    m.add_argument("--data", required=True, help="folder or manifest of new images/videos (path or URI)")
    m.add_argument("--out", required=True, help="output folder for the Parquet files (path or URI)")
    m.add_argument("--model", default="clusterfit", help="clusterfit (default), pretrained or random")
    m.add_argument("--layer", default="res5")
    m.add_argument(
        "--centroids",
        default="auto",
        help="run: the run's k-means (pre-trained model only); own: a k-means of the model's own features of the "
        "run's source (built once); auto (default): run where it fits, own otherwise",
    )
    m.add_argument("overrides", nargs="*", help="extract.<key>=<value>, e.g. extract.num_actors=4")

    i = sub.add_parser("index", help="build a faiss index over a features folder or an embed output (a Ray task)")
    i.add_argument("--features", help="a run's features/<model>/<dataset> folder or an embed --out folder")
    i.add_argument("--run-dir", help="index this run's source embeddings of --model instead")
    i.add_argument("--model", default="clusterfit", help="with --run-dir: which model's embeddings")
    i.add_argument("--layer", default="res5")
    i.add_argument("overrides", nargs="*", help="index.<key>=<value>, e.g. index.kind=ivf index.nprobe=64")

    s = sub.add_parser("search", help="the nearest neighbours of query files in an index")
    s.add_argument("--index", required=True, help="an index folder (or the features folder holding _index/)")
    s.add_argument("--query", required=True, action="append", help="an image or video file (repeatable)")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--nprobe", type=int, help="IVF lists to visit (default: the index's)")
    s.add_argument("--run-dir", help="the model's run, when the index does not record it")
    s.add_argument("--model", help="the model, when the index does not record it")
    return p


def _index_config(run_dir: str | None, overrides: list[str]):
    from cf_ray.config import IndexConfig, load_section

    base = None
    if run_dir:
        from cf_ray.api import read_run_config

        base = read_run_config(run_dir).get("index")
    return load_section(IndexConfig, "index", base, overrides)


def _export(a) -> None:
    from cf_ray.export import export_model

    layers = [l for l in a.layers.split(",") if l] or None
    card = export_model(a.run_dir, a.format, a.out, a.model, layers)
    print(f"exported {a.model} ({a.format}) to {card['out']}")
    print(f"  {card['file']}, model_card.json, MODEL_CARD.md; outputs {', '.join(card['outputs'])}")
    print(f"  max abs diff exported vs eager: {card['check']['max_abs_diff_vs_eager']:.3g}")


def _embed(a) -> None:
    from cf_ray.embed import run_embed

    r = run_embed(a.run_dir, a.data, a.out, a.model, a.layer, a.centroids, a.overrides)
    c = r["centroids"]
    print(
        f"embedded {r['rows']} {r['modality']}s ({r['ok']} ok, {r['skipped']} skipped) "
        f"with {r['model']} at {r['layer']}"
    )
    print(f"  -> {a.out} (id, path, embedding, cluster, distance, error)")
    print(f"  centroids: {c['source']} ({c['description']}), k={c['k']}, {c['uri']}")


def _index(a) -> None:
    from cf_ray import storage
    from cf_ray.api import ApiError, build_own_centroids, check_run_dir, own_features_dir
    from cf_ray.index import build_index

    if bool(a.features) == bool(a.run_dir):
        raise ApiError("pass either --features <folder> or --run-dir <run> (with --model)")
    uri = a.features
    if a.run_dir:
        run = check_run_dir(a.run_dir)
        pre = own_features_dir(run, "pretrained", a.layer)
        if a.model == "pretrained" and storage.exists(storage.join(pre, "_SUCCESS.json")):
            uri = pre
        else:
            uri = build_own_centroids(run, a.model, a.layer)["features"]
    r = build_index(uri, a.layer, _index_config(a.run_dir or _run_of(uri), a.overrides))
    extra = f", nlist {r['nlist']}, nprobe {r['nprobe']}" if "nlist" in r else ""
    print(f"index ({r['kind']}, {r['metric']}{extra}) of {r['n']} x {r['d']} {r['layer']} embeddings -> {r['index']}")


def _run_of(uri: str) -> str | None:
    from cf_ray.index import describe_source

    return describe_source(uri, "res5").get("run_dir")


def _search(a) -> None:
    from cf_ray.api import ApiError
    from cf_ray.index import Searcher

    if a.k < 1:
        raise ApiError(f"-k must be at least 1, got {a.k}")
    s = Searcher(a.index, a.nprobe)
    for q in a.query:
        try:
            hits = s.search_files([q], a.k, a.run_dir, a.model)[0]
        except ApiError as e:
            msg = str(e)
            if "could not be used" in msg:
                reason = msg.split(": ", 1)[1].rsplit(" (pass", 1)[0]
                raise ApiError(
                    f"query {q} cannot be used: {reason}; pass a {s.model().modality} file the run's decoder reads"
                ) from None
            raise
        metric = "1 - cosine similarity" if s.info["metric"] == "cosine" else "squared L2 distance"
        print(f"query {q}: {len(hits)} nearest of {s.info['n']} ({s.info['kind']} index, distance = {metric})")
        print("rank\tid\tpath\tdistance")
        for r, h in enumerate(hits, 1):
            print(f"{r}\t{h['id']}\t{h['path']}\t{h['distance']:.6g}")


def main(argv: list[str], prog: str = "cf-ray") -> int:
    from cf_ray.api import ApiError
    from cf_ray.config import ConfigError
    from cf_ray.sources import SourceError
    from cf_ray.storage import IncompleteOutputError

    a = _parser(prog).parse_args(argv)
    log.setup()
    try:
        {"export": _export, "embed": _embed, "index": _index, "search": _search}[a.command](a)
    except (ApiError, ConfigError, SourceError, IncompleteOutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
