"""Per-clip pseudo-labels and the pseudo-label fit measure: clip choice, clip targets, fit on stored features."""

import numpy as np
import pyarrow as pa
import torch

from cf_ray import features
from cf_ray.pipeline import with_clip_targets
from cf_ray.stages.fit import pseudo_label_fit
from cf_ray.train.loop import CLIP_TARGETS, Classifier, augment, item_logits, pick_clip, save_head


def test_pick_clip_takes_each_videos_drawn_clip_with_its_own_target():
    n, clips = 64, 3
    pixels = np.zeros((n, clips, 2, 4, 4, 3), np.uint8)
    pixels[:] = (np.arange(n)[:, None] * clips + np.arange(clips))[:, :, None, None, None, None]  # value = clip code
    clip_targets = torch.arange(n * clips).view(n, clips)
    x, y = pick_clip(pixels, torch.full((n,), -1), clip_targets, torch.Generator().manual_seed(0))
    codes = x.reshape(n, -1)[:, 0].astype(np.int64)
    assert x.shape == (n, 2, 4, 4, 3) and (x.reshape(n, -1) == codes[:, None]).all()
    assert codes.tolist() == y.tolist()  # each video's target is the one of the clip it got
    assert (codes // clips == np.arange(n)).all() and len(set(codes % clips)) == clips  # its own clips, all drawn
    x, y = pick_clip(pixels, torch.arange(n), None, torch.Generator().manual_seed(0))  # no clip targets: the video's
    assert y.tolist() == list(range(n))
    x, y = pick_clip(pixels[:, :1], torch.arange(n), None, torch.Generator())  # one decoded clip (random mode)
    assert (x == pixels[:, 0]).all()


def test_item_logits_average_each_items_own_clips():
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    backbone.num_features = 5
    net = Classifier(backbone, 3)
    x = torch.randn(4 * 2, 3, 4)  # 4 items x 2 clips, item-major, as pixels.reshape(-1, ...) lays them out
    per_clip = net(x).view(4, 2, 3)
    torch.testing.assert_close(item_logits(net, x, 2), per_clip.mean(1))
    torch.testing.assert_close(item_logits(net, x, 2), net.head(backbone(x).view(4, 2, 5).mean(1)))
    torch.testing.assert_close(item_logits(net, x), net(x))


def test_augment_flip_only_keeps_every_pixel_in_place_or_mirrored():
    x = torch.randn(16, 3, 2, 8, 8)
    out = augment(x, torch.Generator().manual_seed(1), crop=False)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert ((out == x).flatten(1).all(1) | mirrored).all() and 0 < mirrored.sum() < 16
    assert not (augment(x, torch.Generator().manual_seed(1)) == x).flatten(1).all(1).all()  # crop moves pixels


def test_with_clip_targets_aligns_ids_and_drops_videos_without_clips():
    items = pa.table({"id": ["a", "b", "c"], "path": ["pa", "pb", "pc"], "target": [0, 1, 2]})
    clips = pa.table({"id": ["c", "a"], "clusters": pa.FixedSizeListArray.from_arrays(pa.array([2, 1, 0, 0]), 2)})
    out = with_clip_targets(items, clips)
    assert out["id"].to_pylist() == ["a", "c"] and out["target"].to_pylist() == [0, 2]
    assert out[CLIP_TARGETS].to_pylist() == [[0, 0], [2, 1]]


def test_pseudo_label_fit_scores_videos_and_clips_through_the_saved_head(tmp_path):
    # Head = identity on 3-d features: the prediction is the argmax feature.
    head = torch.nn.Linear(3, 3)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3))
        head.bias.zero_()
    save_head(head, str(tmp_path / "model"))
    eye = np.eye(3, dtype=np.float32)
    per_clip = np.stack([[eye[0], eye[0]], [eye[1], 0.8 * eye[2]], [eye[2], 0.4 * eye[1]]])  # (videos, 2 clips, 3)
    table = features.feature_table(
        ["v0", "v1", "v2", "bad"],
        ["p"] * 4,
        [None] * 4,
        ["", "", "", "cannot decode"],
        {"res5": per_clip.mean(1), "clip:res5": per_clip},
        ok=np.array([True, True, True, False]),
    )
    features.write_folder(str(tmp_path / "feats"), table, {})
    # video predictions (clip means): v0 -> 0, v1 -> 1, v2 -> 2; clip predictions 0 0 | 1 2 | 2 1
    assignments = pa.table({"id": ["v2", "v1", "v0"], "cluster": [2, 2, 0]})
    clips = pa.table({"id": ["v0", "v1", "v2"], "clusters": pa.FixedSizeListArray.from_arrays(pa.array([0, 1] * 3), 2)})
    fit = pseudo_label_fit(str(tmp_path / "feats"), str(tmp_path / "model"), assignments, clips)
    assert fit["items"] == 3 and fit["fit"] == 2 / 3  # v1 misses its cluster 2
    assert fit["clip_fit"] == 2 / 6  # (0,0) vs (0,1): 1; (1,2) vs (0,1): 0; (2,1) vs (0,1): 1
    assert fit["clip_fit_video_label"] == 4 / 6  # (0,0) vs 0: 2; (1,2) vs 2: 1; (2,1) vs 2: 1


def test_verdict_names_the_fit_of_the_targets_the_retraining_had():
    from cf_ray.stages.report import _verdict

    transfer = {m: {"res5": {"top1": v}} for m, v in (("random", 0.1), ("pretrained", 0.5), ("clusterfit", 0.4))}
    hist = [{"acc": 0.3}]
    fit = {"fit": 0.45, "clip_fit": 0.35}
    assert "fits only 30% of its own pseudo-labels (in training)" in _verdict(transfer, {"retrain": {"history": hist}})
    assert _verdict(transfer, {}).startswith("Last layer, where the paper expects the gain: ClusterFit res5 40.0 vs ")
    assert "pre-trained res5 50.0 (-10.0 points)." in _verdict(transfer, {})
    per_video = _verdict(transfer, {"retrain": {"history": hist, "fit": fit, "clip_targets": False}})
    assert "fits only 45% of its own pseudo-labels (on the clustered views)" in per_video
    per_clip = _verdict(transfer, {"retrain": {"history": hist, "fit": fit, "clip_targets": True}})
    assert "fits only 35% of its own pseudo-labels (on the clustered views)" in per_clip
