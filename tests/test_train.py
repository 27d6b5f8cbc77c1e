import json

import pyarrow as pa

from cf_ray.config import ImageConfig, ModelConfig, TrainConfig
from cf_ray.demo import make_image_demo
from cf_ray.models.checkpoint import load_backbone
from cf_ray.sources import list_items
from cf_ray.train.loop import train_classifier


def test_rotnet_trains_saves_and_resumes(ray_session, tmp_path):
    data = make_image_demo(tmp_path / "data", n_per_class=8, size=16)
    items, _ = list_items(str(data))
    items = items.append_column("target", pa.array([0] * items.num_rows, pa.int64()))
    cfg = TrainConfig(model=ModelConfig(width=4), epochs=1, batch_size=16, warmup_epochs=0)
    kw = dict(media=ImageConfig(size=16), items=items, task="rotation", num_classes=4,
              storage_path=str(tmp_path / "train"), name="rot", model_uri=str(tmp_path / "model"))
    r1 = train_classifier(cfg, **kw)
    assert [h["epoch"] for h in r1["history"]] == [1] and r1["rows"] == 48
    model, mcfg = load_backbone(str(tmp_path / "model"))
    assert mcfg.width == 4
    # Same run name, more epochs: resumes from the epoch-1 checkpoint instead of starting over.
    r2 = train_classifier(cfg.model_copy(update={"epochs": 2}), **kw)
    assert [h["epoch"] for h in r2["history"]] == [1, 2]
    assert r2["history"][0] == r1["history"][0]
    snapshot = json.loads((tmp_path / "train" / "rot" / "checkpoint_manager_snapshot.json").read_text())
    assert snapshot
