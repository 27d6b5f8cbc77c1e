"""The online service (cf_ray.serve) on the session's real local Ray + Serve, over loopback HTTP.

One application serves a tiny image run and a tiny video run (tests/run_helpers.py: the job's own stages)
on a free port; every route with both kinds, batching under concurrent requests, each bad input's status, and
a model replica killed under load.
"""

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from cf_ray.config import ConfigError, ServeConfig, load_config

APP = "cf_serve_test"
LONG_VIDEO_S = 3.0  # the limit below is 2 s; the demo videos last 1 s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replicas(deployment: str) -> set[str]:
    import ray

    return {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{APP}#{deployment}#")
    }


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory):
    from ray import serve
    from run_helpers import make_run

    from cf_ray.demo_video import render_clip, write_video
    from cf_ray.index import build_index
    from cf_ray.serve import build

    root = tmp_path_factory.mktemp("serve")
    image_run, image_data = make_run(root, "image")
    video_run, video_data = make_run(root, "video")
    for run in (image_run, video_run):  # what `cf-ray index --run-dir R --model pretrained` builds
        build_index(str(run / "features" / "pretrained" / "source"), "res5")
    long_video = write_video(
        root / "long.mp4", render_clip("up", 16, int(LONG_VIDEO_S * 8), np.random.default_rng(0))[0], 8
    )
    cfg = ServeConfig.model_validate(
        {
            "run_dir": str(image_run),
            "more_run_dirs": f"[{video_run}]",
            "which": "pretrained",  # clusterfit needs its own k-means and features first: same path, slower
            "max_body_mb": "1",
            "max_video_s": "2",
            "request_timeout_s": "120",  # a replacement replica may take long to start on a loaded machine
            "max_batch_size": "8",
            "batch_wait_timeout_s": "0.2",
            "model.num_cpus": "0.5",
            "decoder.num_cpus": "0.25",
            "ingress.num_cpus": "0",
        }
    )
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(cfg), name=APP, route_prefix="/")
    inputs = {
        "image": (sorted(image_data.glob("*/*.jpg"))[0], "image/jpeg"),
        "video": (sorted(video_data.glob("*/*.mp4"))[0], "video/mp4"),
    }
    yield {
        "url": f"http://127.0.0.1:{port}",
        "runs": {"image": image_run, "video": video_run},
        "inputs": inputs,
        "long_video": long_video,
        "cfg": cfg,
    }
    serve.shutdown()


def _post(service, route: str, kind: str, **kw) -> requests.Response:
    path, ct = service["inputs"][kind]
    return requests.post(f"{service['url']}/v1/{route}", data=path.read_bytes(), headers={"Content-Type": ct}, **kw)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_every_route_answers_like_the_model_in_process(service, kind):
    from cf_ray.api import load_model

    model = load_model(service["runs"][kind], "pretrained", centroids="run")
    path, ct = service["inputs"][kind]
    want = model.embed([path.read_bytes()], layer="res5")

    r = _post(service, "embed", kind)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["modality"], body["layer"], body["dim"]) == (kind, "res5", model.taps["res5"])
    np.testing.assert_allclose(body["embedding"], want[0], rtol=1e-4, atol=1e-5)

    r = _post(service, "embed", kind, params={"layer": "res4"})
    assert r.status_code == 200 and r.json()["dim"] == model.taps["res4"]

    with path.open("rb") as f:  # multipart, the part's own content type
        r = requests.post(f"{service['url']}/v1/embed", files={"file": (path.name, f, ct)})
    assert r.status_code == 200 and r.json()["dim"] == model.taps["res5"]

    r = _post(service, "assign", kind)
    assert r.status_code == 200, r.text
    cluster, dist = model.assign(want)
    assert r.json()["cluster"] == int(cluster[0]) and r.json()["distance"] == pytest.approx(float(dist[0]), abs=1e-4)

    r = _post(service, "search", kind, params={"k": 2})
    assert r.status_code == 200, r.text
    hits = r.json()["neighbours"]
    assert (
        r.json()["metric"] == "cosine"
        and len(hits) == 2
        and hits[0]["path"] == str(path)
        and hits[0]["distance"] == pytest.approx(0, abs=1e-4)
    )
    assert hits[0]["distance"] <= hits[1]["distance"]


def test_model_card_and_health(service):
    r = requests.get(f"{service['url']}/v1/model")
    assert r.status_code == 200
    cards = r.json()["models"]
    assert set(cards) == {"image", "video"}
    assert cards["video"]["input"]["clip_len"] == 4 and cards["image"]["input"]["size"] == 16
    assert cards["image"]["assign"]["layer"] == "res5" and cards["image"]["search"]["items"] == 12
    assert r.json()["limits"]["max_video_s"] == 2
    r = requests.get(f"{service['url']}/v1/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_concurrent_requests_share_forward_passes(service):
    from ray import serve

    with ThreadPoolExecutor(12) as pool:
        rs = list(pool.map(lambda _: _post(service, "embed", "image"), range(36)))
    assert all(r.status_code == 200 for r in rs)
    sizes = [int(r.headers["x-cf-ray-batch-size"]) for r in rs]
    assert max(sizes) > 1, sizes
    seen = serve.get_deployment_handle("ImageModel", APP).stats.remote().result()
    assert max(seen) > 1 and sum(n * c for n, c in seen.items()) >= 36


def _chunks(data: bytes, n: int = 65536):
    for i in range(0, len(data), n):
        yield data[i : i + n]


BAD = [
    ("empty body", dict(data=b"", headers={"Content-Type": "image/jpeg"}), 400, "empty body"),
    ("wrong content type", dict(data=b"hello", headers={"Content-Type": "text/plain"}), 415, "Content-Type"),
    ("no content type", dict(data=b"hello"), 415, "Content-Type"),
    (
        "undecodable image",
        dict(data=b"\xff\xd8\xff\xe0 not a jpeg", headers={"Content-Type": "image/jpeg"}),
        422,
        "cannot decode the image",
    ),
    (
        "undecodable video",
        dict(data=b"\x00\x00\x00\x18ftypmp42 junk", headers={"Content-Type": "video/mp4"}),
        422,
        "cannot decode the video",
    ),
    ("body over the limit", dict(data=b"x" * (2**20 + 1), headers={"Content-Type": "image/jpeg"}), 413, "limit"),
    (
        "chunked body over the limit",
        dict(data=_chunks(b"x" * (2**20 + 10)), headers={"Content-Type": "video/mp4"}),
        413,
        "limit",
    ),
    ("uri when uris are off", dict(json={"uri": "/etc/passwd"}), 403, "URI inputs are disabled"),
    ("bad json", dict(data=b"{nope", headers={"Content-Type": "application/json"}), 400, "invalid JSON"),
    ("multipart without a file", dict(data={"a": "b"}, files={}), 400, "multipart"),
    ("unknown layer", dict(params={"layer": "res9"}), 400, "not a tap"),
    ("past its deadline", dict(headers={"x-cf-ray-timeout-s": "0.000001"}), 504, "no answer within"),
]


def test_bad_inputs_get_4xx_json_and_no_replica_restarts(service):
    before = {d: _replicas(d) for d in ("Ingress", "Decoder", "ImageModel", "VideoModel")}
    img_path, img_ct = service["inputs"]["image"]
    for name, kw, status, words in BAD:
        kw = dict(kw)
        if "data" not in kw and "json" not in kw:  # a good image with a bad parameter
            kw["data"] = img_path.read_bytes()
            kw["headers"] = {"Content-Type": img_ct, **kw.get("headers", {})}
        if name == "multipart without a file":
            kw = {"files": {"note": (None, "just a field")}}
        r = requests.post(f"{service['url']}/v1/embed", **kw)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert words in r.json()["error"] and r.json()["status"] == status, (name, r.text)
    r = requests.post(
        f"{service['url']}/v1/embed", data=service["long_video"].read_bytes(), headers={"Content-Type": "video/mp4"}
    )
    assert r.status_code == 422 and "above the 2 s limit" in r.json()["error"], r.text
    r = _post(service, "search", "image", params={"k": 1000})
    assert r.status_code == 400 and "above the limit" in r.json()["error"]
    r = _post(service, "search", "image", params={"k": "abc"})
    assert r.status_code == 400 and "k" in r.json()["error"]
    assert {d: _replicas(d) for d in before} == before  # nothing crashed or restarted
    assert _post(service, "embed", "video").status_code == 200  # and the slots were freed


def test_uri_inputs_only_under_allowed_prefixes():
    from cf_ray.serve.inputs import HttpError, _uri

    with pytest.raises(HttpError) as e:
        _uri(b'{"uri": "s3://b/public/a.jpg"}', allow_uris=False, prefixes=("s3://b/public/",))
    assert e.value.status == 403
    assert _uri(b'{"uri": "s3://b/public/a.jpg"}', True, ("s3://b/public/",)).kind == "image"
    assert _uri(b'{"uri": "s3://b/public/v.mp4"}', True, ("s3://b/public/",)).kind == "video"
    for uri in ("s3://b/private/a.jpg", "s3://b/public/../private/a.jpg", "/etc/passwd"):
        with pytest.raises(HttpError) as e:
            _uri(f'{{"uri": "{uri}"}}'.encode(), True, ("s3://b/public/",))
        assert e.value.status == 403 and "outside the allowed prefixes" in e.value.reason


def test_serve_config_from_flat_strings_and_its_checks():
    import inspect

    from cf_ray.serve import app

    # `serve run cf_ray.serve:app k=v` validates the strings only when the annotation is the class itself
    assert inspect.signature(app).parameters["args"].annotation is ServeConfig
    cfg = ServeConfig.model_validate(
        {"run_dir": "r", "model.max_replicas": "4", "model.use_gpu": "no", "more_run_dirs": "[a, b]"}
    )
    assert cfg.model.max_replicas == 4 and cfg.model.use_gpu == "no" and cfg.more_run_dirs == ["a", "b"]
    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        load_config(ServeConfig, None, ["run_dir=r", "max_batch_size=128"])
    with pytest.raises(ConfigError, match="min_replicas"):
        load_config(ServeConfig, None, ["run_dir=r", "model.min_replicas=3"])
    with pytest.raises(ConfigError, match="run_dir"):
        load_config(ServeConfig, None, [])


def test_killed_model_replica_is_replaced_and_later_requests_succeed(service):
    import ray

    (victim,) = _replicas("ImageModel")
    statuses: list[int] = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            try:
                statuses.append(_post(service, "embed", "image", timeout=180).status_code)
            except requests.RequestException:
                statuses.append(-1)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    warm = time.time() + 120
    while len(statuses) < 8 and time.time() < warm:
        time.sleep(0.05)
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    deadline = time.time() + 240  # the controller notices and starts a replacement
    while time.time() < deadline and not (_replicas("ImageModel") - {victim}):
        time.sleep(0.5)
    ok_after = len(statuses)
    while time.time() < deadline and statuses[ok_after:].count(200) < 8:
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    assert _replicas("ImageModel") - {victim}, "no replacement replica"
    assert set(statuses) <= {200, 503}, statuses  # a request on the dead replica: 503 + Retry-After, never a 500
    assert statuses[ok_after:].count(200) >= 8
    assert all(_post(service, "assign", "image").status_code == 200 for _ in range(3))


def test_serve_config_file_and_rayservice_validate():
    import ray
    import yaml
    from ray.serve.schema import ServeDeploySchema
    from test_cluster_yaml import IMAGE, KUBERAY, ROOT

    local = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text()))
    assert local.http_options.host == "127.0.0.1"  # Serve's config default would be 0.0.0.0
    (app,) = local.applications
    assert app.import_path == "cf_ray.serve:app"
    ServeConfig.model_validate(app.args)

    rs = yaml.safe_load((KUBERAY / "rayservice.yaml").read_text())
    assert (rs["apiVersion"], rs["kind"]) == ("ray.io/v1", "RayService")
    serve_cfg = ServeDeploySchema.model_validate(yaml.safe_load(rs["spec"]["serveConfigV2"]))
    (app,) = serve_cfg.applications
    cfg = ServeConfig.model_validate(app.args)
    assert cfg.model.use_gpu == "yes" and cfg.run_dir.startswith("s3://")
    assert "pip" not in app.runtime_env and app.runtime_env["working_dir"].startswith("s3://")  # the image has them
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__ and cluster["authOptions"] == {"mode": "token"}
    images = {
        c["image"]
        for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        for c in g["template"]["spec"]["containers"]
    }
    assert images == {IMAGE}  # cf_ray's one image (deploy/Dockerfile), as in raycluster.yaml


def test_decoder_reads_allowed_uris_with_the_size_limit(tmp_path):
    from helpers import write_image

    from cf_ray.config import ImageConfig
    from cf_ray.serve.app import Decoder

    dec = Decoder.func_or_class({"image": ImageConfig(size=16).model_dump()}, max_bytes=4000, max_video_s=5)
    small = write_image(tmp_path / "small.png", size=(20, 20), fmt="PNG")
    big = write_image(tmp_path / "big.png", size=(200, 200), fmt="PNG")
    assert dec._decode("image", None, str(small), 10)["pixels"].shape == (16, 16, 3)
    assert dec._decode("image", None, str(big), 10)["status"] == 413
    assert dec._decode("image", None, str(tmp_path / "missing.jpg"), 10)["status"] == 404
    assert dec._decode("image", b"not an image", None, 10)["status"] == 422
