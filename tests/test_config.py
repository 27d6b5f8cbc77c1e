from pathlib import Path

import pytest

from cf_ray.config import ConfigError, JobConfig, load_config, packaged_configs


def test_defaults_are_valid():
    cfg = load_config(JobConfig)
    assert cfg.cluster.k > 0 and cfg.cluster.layer in cfg.extract.layers


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        JobConfig, None, ["cluster.k=7", "retrain.model.width=8", "extract.layers=[res4, res5]", "probe.layers=[res5]"]
    )
    assert cfg.cluster.k == 7 and cfg.retrain.model.width == 8 and cfg.extract.layers == ["res4", "res5"]


@pytest.mark.parametrize(
    "override, key",
    [
        ("cluster.kk=3", "cluster.kk"),
        ("foo=1", "foo"),
        ("cluster.k=abc", "cluster.k"),
        ("cluster.k=0", "cluster.k"),
        ("retrain.model.arch=nosuchnet", "retrain.model.arch"),
        ("pretrain.source=checkpoint", "pretrain"),
    ],
)
def test_bad_keys_and_types_are_named(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(JobConfig, None, [override])
    assert key in str(e.value)


def test_layers_used_must_be_extracted():
    with pytest.raises(ConfigError, match="res2"):
        load_config(JobConfig, None, ["cluster.layer=res2"])


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(JobConfig, None, ["cluster.k"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(JobConfig, "no/such.yaml")


@pytest.mark.parametrize("name", [n for n in packaged_configs() if n.startswith(("image", "video"))])
def test_every_shipped_job_config_loads(name):
    """By bare name (the packaged file) and by its path in the checkout."""
    cfg = load_config(JobConfig, name)
    assert cfg == load_config(JobConfig, Path(__file__).parent.parent / "cf_ray" / "configs" / name)
    assert cfg.modality == name.split("_")[0]


def test_config_reference_is_current():
    from cf_ray.config_doc import render

    doc = Path(__file__).parent.parent / "docs" / "config.md"
    assert doc.read_text() == render(), "docs/config.md is stale: run python -m cf_ray.config_doc > docs/config.md"


def test_several_transfer_targets():
    cfg = load_config(
        JobConfig,
        None,
        ["target=a/t", "targets.flowers=b/flowers", "targets.voc.path=c/voc", "targets.voc.multi_label=true"],
    )
    t = cfg.transfer_targets()
    assert list(t) == ["target", "flowers", "voc"]
    assert (t["target"].path, t["flowers"].path, t["voc"].path) == ("a/t", "b/flowers", "c/voc")
    assert [x.multi_label for x in t.values()] == [False, False, True]
    assert load_config(JobConfig, None, ["probe.multi_label=true", "targets.x=p"]).transfer_targets()["x"].multi_label
    assert load_config(JobConfig).transfer_targets() == {}


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["targets.2x=p"], "must start with a letter"),
        (["targets.a/b=p"], "must start with a letter"),
        (["target=p", "targets.target=q"], "give the second target another name"),
        (["targets.voc.path=p", "targets.voc.multi_label=true", "probe.finetune=true"], "single-label targets only"),
        (["targets.voc.multi_label=true"], "targets.voc.path"),
    ],
)
def test_bad_targets_are_named(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(JobConfig, None, overrides)


def test_stage_command_takes_overrides_after_options():
    """README: `python -m cf_ray cluster --config c.yaml --demo cluster.k=60`."""
    from cf_ray.cli import parser

    args = parser().parse_intermixed_args(["cluster", "--config", "c.yaml", "--demo", "cluster.k=60", "targets.f=x"])
    assert (args.stage, args.config, args.demo, args.overrides) == (
        "cluster",
        "c.yaml",
        True,
        ["cluster.k=60", "targets.f=x"],
    )
