"""`extends: base.yaml`: chains merged child over base, errors located in the file that holds the key."""

import pytest
import yaml
from typer.testing import CliRunner

from trainer.cli import app
from trainer.config import ConfigError, dump_config, load_config, read_saved_config
from trainer.train.plan import CONFIG_CHECKS

# line numbers matter: the error tests below name them
BASE = """\
name: base
seed: 0
data:
  layout: folder
  path: '{data}'
  bs: 8
model:
  arch: {arch}
train:
  wd: 0.05
  stages:
    - {{epochs: 2, lr: 0.01}}
    - {{epochs: 1, lr: 0.001}}
"""

CHILD = """\
extends: base.yaml
name: child
model:
  ps: 0.3
train:
  stages:
    - {epochs: 3, lr: 0.02}
"""


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def base(tmp_path, name="base.yaml", arch="bnresnet", **replace):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    text = BASE.format(data=data, arch=arch)
    for old, new in replace.items():
        text = text.replace(old, new)
    return write(tmp_path / name, text)


def error_of(path, sets=(), **kw):
    with pytest.raises(ConfigError) as e:
        load_config(path, sets, checks=CONFIG_CHECKS, **kw)
    return str(e.value)


def test_a_two_level_chain_merges_mappings_and_replaces_lists(tmp_path, monkeypatch):
    base(tmp_path)
    write(tmp_path / "child.yaml", CHILD)
    # in a subfolder: its extends is relative to exp/, the child's is relative to tmp_path
    grand = write(tmp_path / "exp" / "grand.yaml", "# a bigger batch\nextends: ../child.yaml\ndata:\n  bs: 16\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(grand, checks=CONFIG_CHECKS)
    assert cfg.name == "child" and cfg.seed == 0
    assert (cfg.data.layout, cfg.data.path, cfg.data.bs) == ("folder", str(tmp_path / "data"), 16)
    assert (cfg.model.arch, cfg.model.ps) == ("bnresnet", 0.3)
    assert cfg.train.wd == 0.05
    assert [(s.epochs, s.lr) for s in cfg.train.stages] == [(3, 0.02)]  # the base's two stages are gone


def test_null_in_the_child_drops_the_bases_key(tmp_path):
    # the base's bs and wd go back to their defaults; a base's layers would otherwise reach a timm arch
    base(tmp_path)
    child = write(tmp_path / "child.yaml", CHILD.replace("train:", "data: {bs: null}\ntrain:\n  wd: null"))
    cfg = load_config(child, checks=CONFIG_CHECKS)
    assert (cfg.data.bs, cfg.train.wd, cfg.model.ps) == (64, 0.01, 0.3)
    # a null that drops nothing is a typo, not a no-op; a known key no base set is (layers here)
    typo = write(tmp_path / "typo.yaml", "extends: base.yaml\nmodel: {layers: null}\ndata: {bss: null}\n")
    assert error_of(typo).startswith(f"{typo}:3: data.bss: unknown key; did you mean 'bs'?")
    deep = write(tmp_path / "deep.yaml", CHILD.replace("  ps: 0.3", "  ps: 0.3\n  layerz: null"))
    assert error_of(deep).startswith(f"{deep}:5: model.layerz: unknown key; did you mean 'layers'?")


def test_a_null_under_a_section_the_base_does_not_set_means_the_default_too(tmp_path):
    # JSON Merge Patch at any depth: it said "patience: is empty" here, where data.resize took its default
    base(tmp_path)
    child = write(tmp_path / "child.yaml", "extends: base.yaml\ntrain:\n  early_stop: {patience: null}\n")
    assert load_config(child, checks=CONFIG_CHECKS).train.early_stop.patience == 3
    # a typo'd null in such a section, or in the data section's own sections, is found with its hint
    typo = write(tmp_path / "typo.yaml", "extends: base.yaml\ntrain:\n  early_stop: {patiense: null}\n")
    assert error_of(typo).startswith(f"{typo}:3: train.early_stop.patiense: unknown key; did you mean 'patience'?")
    sub = write(tmp_path / "sub.yaml", "extends: base.yaml\ndata:\n  subset: {trian: 5}\n")
    assert error_of(sub).startswith(f"{sub}:3: data.subset.trian: unknown key; did you mean 'train'?")
    # the first base is read as any config: its own null is empty there, as in the file alone
    write(
        tmp_path / "own.yaml", BASE.format(data=tmp_path / "data", arch="bnresnet") + "  early_stop: {patience: null}\n"
    )
    child = write(tmp_path / "child2.yaml", "extends: own.yaml\n")
    assert "own.yaml:14: train.early_stop.patience: is empty" in error_of(child)
    odd = write(tmp_path / "odd.yaml", "extends: base.yaml\ndata:\n  ~: null\n")  # a null key, dropping nothing
    assert error_of(odd).startswith(f"{odd}:3: data.~: a key must be a name, not null")


def test_the_saved_config_is_the_merged_one_without_extends(tmp_path):
    base(tmp_path)
    child = write(tmp_path / "child.yaml", CHILD)
    saved = dump_config(load_config(child))
    assert "extends" not in saved
    data = yaml.safe_load(saved)
    assert data["name"] == "child" and data["data"]["bs"] == 8 and data["train"]["wd"] == 0.05
    assert (data["model"]["arch"], data["model"]["ps"]) == ("bnresnet", 0.3)
    assert len(data["train"]["stages"]) == 1 and data["train"]["stages"][0]["epochs"] == 3
    res = CliRunner().invoke(app, ["check", str(child)])
    assert res.exit_code == 0, res.output
    assert "extends" not in res.output and "ps: 0.3" in res.output and "wd: 0.05" in res.output


def test_a_run_saved_before_a_check_was_added_still_loads(tmp_path):
    # magnitude without auto: randaugment did nothing and was accepted then; the run trained that way
    text = base(tmp_path).read_text() + "transforms: {magnitude: 12}\n"
    assert "magnitude is RandAugment's" in error_of(write(tmp_path / "new.yaml", text))
    saved = read_saved_config(write(tmp_path / "run" / "config.yaml", text))
    assert (saved.transforms.auto, saved.transforms.magnitude) == ("none", 12)


def test_a_saved_config_does_not_follow_extends(tmp_path):
    text = "extends: ../base.yaml\n" + base(tmp_path).read_text()  # a valid config but for extends
    run_config = write(tmp_path / "run" / "config.yaml", text)
    with pytest.raises(ConfigError) as e:
        read_saved_config(run_config)
    assert str(e.value) == f"{run_config}:1: extends: unknown key"


def test_a_cycle_is_refused_with_the_chain(tmp_path):
    a = write(tmp_path / "a.yaml", "extends: b.yaml\n")
    b = write(tmp_path / "b.yaml", "name: b\nextends: a.yaml\n")
    assert error_of(a) == f"{b}:2: extends: a cycle: {a} -> {b} -> {a}"
    me = write(tmp_path / "me.yaml", "name: me\nextends: ./me.yaml\n")
    assert error_of(me) == f"{me}:2: extends: a cycle: {me} -> {me}"


def test_a_missing_base_names_the_folder_it_was_looked_for_in(tmp_path, monkeypatch):
    child = write(tmp_path / "configs" / "child.yaml", "extends: base.yaml\n")
    base(tmp_path)  # in tmp_path, not in configs/ where the child looks
    monkeypatch.chdir(tmp_path)
    assert error_of(child) == f"{child}:1: extends: base.yaml not found (relative to {tmp_path / 'configs'}/)"
    assert error_of("configs/child.yaml") == "configs/child.yaml:1: extends: base.yaml not found (relative to configs/)"


def test_extends_must_name_a_mapping_config(tmp_path):
    for i, value in enumerate(["3", "[base.yaml]", "''", ""]):
        p = write(tmp_path / f"c{i}.yaml", f"name: c\nextends: {value}\n")
        assert error_of(p) == f"{p}:2: extends: give the path of the config to extend, e.g. extends: base.yaml"
    write(tmp_path / "list.yaml", "- 1\n- 2\n")
    p = write(tmp_path / "d.yaml", "extends: list.yaml\n")
    assert error_of(p) == f"{tmp_path / 'list.yaml'}:1: the config must be a mapping of keys (name, data, model, train)"


def test_every_base_is_parsed_safely(tmp_path):
    write(tmp_path / "dup.yaml", "name: a\nseed: 1\nname: b\n")
    p = write(tmp_path / "c.yaml", "extends: dup.yaml\n")
    assert error_of(p) == f"{tmp_path / 'dup.yaml'}:3: duplicate key 'name' (first on line 1)"
    write(tmp_path / "tag.yaml", "name: !!python/object/apply:os.system [echo hi]\n")
    p = write(tmp_path / "t.yaml", "extends: tag.yaml\n")
    assert error_of(p).startswith(f"{tmp_path / 'tag.yaml'}:1: not valid YAML")


def test_a_chain_longer_than_the_limit_is_refused(tmp_path):
    for i in range(25):
        write(tmp_path / f"c{i}.yaml", f"extends: c{i + 1}.yaml\n")
    assert error_of(tmp_path / "c0.yaml") == (
        f"{tmp_path / 'c19.yaml'}:1: extends: more than 20 configs in the chain; is it meant to be this long?"
    )


def test_an_invalid_value_is_reported_in_the_file_and_line_that_hold_it(tmp_path):
    b = base(tmp_path, **{"bs: 8": "bs: 0"})
    child = write(tmp_path / "child.yaml", CHILD.replace("ps: 0.3", "ps: 2"))
    msg = error_of(child)
    assert f"{b}:6: data.bs: Input should be greater than or equal to 1" in msg
    assert f"{child}:4: model.ps: Input should be less than 1" in msg
    assert msg.count("\n") == 1  # two errors, no more


def test_a_list_belongs_to_the_first_file_that_has_it(tmp_path):
    b = base(tmp_path, **{"epochs: 1, lr": "epochs: 0, lr"})
    child = write(tmp_path / "child.yaml", "extends: base.yaml\nname: child\n")
    assert error_of(child) == f"{b}:13: train.stages.1.epochs: Input should be greater than or equal to 1"
    write(tmp_path / "child.yaml", CHILD)  # the child's stages replace the base's bad one
    assert load_config(child).train.stages[0].epochs == 3


def test_a_key_in_no_file_points_at_the_child(tmp_path):
    base(tmp_path, **{"model:\n  arch: bnresnet\n": ""})
    child = write(tmp_path / "child.yaml", "# the child\nextends: base.yaml\nname: child\n")
    assert error_of(child) == f"{child}:2: model: required key is missing"


def test_an_unknown_key_in_the_base_gets_did_you_mean(tmp_path):
    b = base(tmp_path, **{"  wd: 0.05": "  wdd: 0.05"})
    child = write(tmp_path / "child.yaml", CHILD)
    assert error_of(child) == f"{b}:10: train.wdd: unknown key; did you mean 'wd'?"


def test_a_domain_check_points_at_the_base(tmp_path):
    b = base(tmp_path, arch="bnresnett")
    child = write(tmp_path / "child.yaml", CHILD)
    assert f"{b}:8: model.arch: unknown architecture 'bnresnett'; did you mean 'bnresnet'?" in error_of(child)


def test_set_overrides_a_key_from_the_base_and_its_errors_name_the_flag(tmp_path):
    base(tmp_path)
    child = write(tmp_path / "child.yaml", CHILD)
    assert load_config(child, ["data.bs=32", "train.wd=0.1"]).data.bs == 32
    assert error_of(child, ["data.bs=0"]) == "--set data.bs=0: data.bs: Input should be greater than or equal to 1"


def test_a_config_given_as_text_extends_from_the_current_folder(tmp_path, monkeypatch):
    base(tmp_path)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(text="extends: base.yaml\nmodel: {ps: 0.1}\n")
    assert (cfg.name, cfg.model.arch, cfg.model.ps) == ("base", "bnresnet", 0.1)
    msg = error_of(None, text="name: t\nextends: other.yaml\n")
    assert msg == "<string>:2: extends: other.yaml not found (relative to the current folder)"
    msg = error_of(None, text="extends: base.yaml\nseed: -1\n")
    assert msg.startswith("<string>:2: seed: Input should be greater than or equal to 0")
