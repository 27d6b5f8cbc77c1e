import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cf_ray.config import ProbeConfig
from cf_ray.stages.probe import probe_layer, run_probe
from cf_ray.storage import SUCCESS


def _blobs(n, d, k, sep, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, sep, (k, d))
    y = rng.integers(0, k, n)
    return (centres[y] + rng.normal(0, 1, (n, d))).astype(np.float32), y


def test_separable_features_score_high():
    x, y = _blobs(600, 16, 4, 3.0, 0)
    r = probe_layer(x[:400], y[:400], x[400:], y[400:], 4, ProbeConfig(epochs=50))
    assert r["top1"] > 0.95 and r["weight_decay"] in ProbeConfig().weight_decays


def test_noise_scores_near_chance():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 16)).astype(np.float32)
    y = rng.integers(0, 4, 600)
    r = probe_layer(x[:400], y[:400], x[400:], y[400:], 4, ProbeConfig(epochs=50))
    assert r["top1"] < 0.4


def test_voc_average_precision_uses_the_precision_envelope():
    from cf_ray.stages.probe import average_precision

    scores = np.array([0.9, 0.8, 0.7, 0.6])
    assert average_precision(scores, np.array([1, 1, 0, 0])) == 1.0
    assert average_precision(scores, np.array([1, 0, 1, 0])) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # positives 2nd and 3rd: the envelope lifts recall 0.5 to precision 2/3 (sklearn's step AP would give 0.583)
    assert average_precision(scores, np.array([0, 1, 1, 0])) == pytest.approx(2 / 3)


def _multilabel_parquet(path, n, d, k, seed, signal):
    """Extraction-format Parquet (id, label 'a|b', error, feat_res5) where each label adds its own direction."""
    rng = np.random.default_rng(seed)
    dirs = np.random.default_rng(99).normal(0, 1, (k, d))
    y = rng.random((n, k)) < 0.3
    y[y.sum(1) == 0, 0] = True
    x = (signal * y.astype(float) @ dirs + rng.normal(0, 1, (n, d))).astype(np.float32)
    labels = ["|".join(f"c{j}" for j in np.nonzero(row)[0]) for row in y]
    feat = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d)
    path.mkdir(parents=True)
    pq.write_table(
        pa.table({"id": [str(i) for i in range(n)], "label": labels, "error": [""] * n, "feat_res5": feat}),
        path / "part-00000.parquet",
    )
    (path / SUCCESS).write_text("{}")  # a complete extraction output
    return str(path)


def test_multi_label_probe_reports_map(tmp_path):
    cfg = ProbeConfig(layers=["res5"], epochs=50, multi_label=True, weight_decays=[1e-4, 1e-2])
    good = run_probe(
        cfg,
        _multilabel_parquet(tmp_path / "tr", 400, 16, 5, 0, 3.0),
        _multilabel_parquet(tmp_path / "te", 200, 16, 5, 1, 3.0),
    )
    r = good["res5"]
    assert r["metric"] == "map" and r["score"] == r["map"] > 0.9 and r["classes"] == 5
    noise = run_probe(
        cfg,
        _multilabel_parquet(tmp_path / "tr0", 400, 16, 5, 0, 0.0),
        _multilabel_parquet(tmp_path / "te0", 200, 16, 5, 1, 0.0),
    )
    assert noise["res5"]["map"] < 0.6  # about the label frequency (~0.35) when features carry nothing
    with pytest.raises(ValueError, match="single-label"):
        ProbeConfig(multi_label=True, finetune=True)
