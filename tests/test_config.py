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


@pytest.mark.parametrize(
    "text, where, says",
    [
        ("cluster:\n  k: [1, 2\nretrain: {epochs: 3}\n", ":3:", "expected ',' or ']'"),  # unclosed [
        ("cluster:\n\tk: 3\n", ":2:1:", "cannot start any token; indent with spaces"),  # a tab
        ("cluster:\n  k: 3\n   layer: res4\n", ":3:9:", "mapping values are not allowed here"),  # bad indent
        ("cluster:\n  k: 4\n x: 3\n", ":3:2:", "expected <block end>"),  # dedent into nowhere
        ("cluster: {k: 4}\ncluster: {k: 5}\n", ":2:1:", "duplicate key cluster (first at line 1)"),
        ("- 1\n- 2\n", ":1:1:", "must hold a mapping"),
        ("retrain:\n  epochs: 3\ncluster:\n  k: 0\n", ":4:6:", "cluster.k: Input should be greater than 0"),
        ("cluster:\n  k: 3\n  kk: 3\n", ":3:3:", "cluster.kk: unknown key"),
        ("targets:\n  voc: {multi_label: true}\n", ":2:3:", "targets.voc.path: Field required"),
    ],
)
def test_config_file_errors_are_one_line_with_file_line_and_column(tmp_path, text, where, says):
    path = tmp_path / "my.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(JobConfig, path)
    msg = str(e.value)
    assert "\n" not in msg and f"{path}{where}" in msg and says in msg, msg


def test_override_errors_name_the_override(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("cluster:\n  k: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(JobConfig, path, ["cluster.k=0", "retrain.epochs=-1"])
    msg = str(e.value)
    assert "\n" not in msg and "override cluster.k=0: cluster.k:" in msg and "override retrain.epochs=-1" in msg
    assert str(path) not in msg  # the file's value was overridden: the override is what to fix
    with pytest.raises(ConfigError, match=r"override 'extract.layers=\[res4': the value is not valid YAML"):
        load_config(JobConfig, None, ["extract.layers=[res4"])


def test_packaged_configs_by_bare_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {"image_demo.yaml", "video_demo.yaml", "sweep_demo.yaml", "image_cifar10.yaml"} <= set(packaged_configs())
    assert load_config(JobConfig, "image_cifar10.yaml") == load_config(JobConfig, "image_cifar10")
    with pytest.raises(ConfigError, match=r"configs/ moved into the package: pass the bare name.*image_demo.yaml"):
        load_config(JobConfig, "configs/image_cifar10.yaml")
    (tmp_path / "image_cifar10.yaml").write_text("cluster: {k: 7}\n")  # a file of that name here wins
    assert load_config(JobConfig, "image_cifar10.yaml").cluster.k == 7
