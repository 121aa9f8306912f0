import json

import pytest
from typer.testing import CliRunner

from tests.conftest import tiny_config
from trainer.cli import app
from trainer.config import ConfigError, Stage, load_config
from trainer.train.plan import CONFIG_CHECKS

runner = CliRunner()


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def error_of(path, sets=()):
    with pytest.raises(ConfigError) as e:
        load_config(path, sets, checks=CONFIG_CHECKS)
    return str(e.value)


def test_valid_config_loads_and_reads_1e_minus_3_as_a_number(tmp_path, folder_data):
    cfg = load_config(write(tmp_path, tiny_config(folder_data, stages="[{epochs: 1, lr: 1e-3}]")))
    assert cfg.train.stages[0].lr == pytest.approx(1e-3)
    assert isinstance(cfg.train.stages[0].lr, float)


def test_unknown_key_names_file_line_key_and_hint(tmp_path, folder_data):
    text = tiny_config(folder_data).replace("bs: 8", "bs: 8, valid_pc: 0.3").replace("layout: folder", "layout: csv")
    p = write(tmp_path, text)
    msg = error_of(p)
    assert f"{p}:3: data.valid_pc: unknown key; did you mean 'valid_pct'?" in msg


@pytest.mark.parametrize(
    "key,said",
    [("~", "data.~: a key must be a name, not null"), ("0x1F", "data.0x1F: a key must be a name, not a number")],
)
def test_a_key_that_is_not_a_name_is_spelled_as_the_file_writes_it(tmp_path, folder_data, key, said):
    p = write(tmp_path, tiny_config(folder_data).replace("bs: 8", f"bs: 8, {key}: 3"))
    assert f"{p}:3: {said}" in error_of(p)  # it said "data.None: is empty; give a value"
    block = write(tmp_path, f"data:\n  layout: folder\n  path: '{folder_data}'\n  {key}: 3\n", "block.yaml")
    assert f"{block}:4: {said}" in error_of(block)  # the key's own line, not its section's


def test_a_value_in_a_message_is_one_line_however_long():
    from trainer.config import yaml_word

    names = ["timm/resnet18d", "timm/efficientnet_b0", "timm/convnext_nano", "timm/mobilenetv3_large_100"] * 3
    assert yaml_word(names) == "[" + ", ".join(names) + "]"  # PyYAML folds at 80 columns by default


def test_nested_unknown_key_in_a_stage(tmp_path, folder_data):
    p = write(tmp_path, tiny_config(folder_data, stages="\n    - {epochs: 1, shedule: sgdr}"))
    assert f"{p}:7: train.stages.0.shedule: unknown key; did you mean 'schedule'?" in error_of(p)


def test_wrong_type_and_out_of_range(tmp_path, folder_data):
    p = write(tmp_path, tiny_config(folder_data, stages="\n    - {epochs: two, lr: -1}"))
    msg = error_of(p)
    assert "train.stages.0.epochs" in msg and "valid integer" in msg
    assert "train.stages.0.lr: Input should be greater than 0" in msg


def test_true_for_a_number_is_said_beside_its_sections_other_errors(tmp_path, folder_data):
    # it was a check of the whole section, which stopped there: the other two went unsaid
    p = write(tmp_path, tiny_config(folder_data).replace("bs: 8", "bs: true, channels: 7, sizee: 3"))
    assert error_of(p).splitlines() == [
        f"{p}:3: data.bs: takes a number, not true",
        f"{p}:3: data.channels: Input should be 1 or 3",
        f"{p}:3: data.sizee: unknown key; did you mean 'size'?",
    ]
    lrs = write(
        tmp_path, tiny_config(folder_data, stages="\n    - {epochs: true, lr: [true, 0.1], shedule: sgdr}"), "s.yaml"
    )
    assert error_of(lrs).splitlines() == [
        f"{lrs}:7: train.stages.0.epochs: takes a number, not true",
        f"{lrs}:7: train.stages.0.lr: takes a number, not [true, 0.1]",
        f"{lrs}:7: train.stages.0.shedule: unknown key; did you mean 'schedule'?",
    ]
    stage = Stage(epochs=1)
    with pytest.raises(ValueError, match="takes a number, not true"):
        stage.epochs = True  # an assignment is checked too (validate_assignment)


@pytest.mark.parametrize(
    "lr,said",
    [
        ("{max: -1}", ["train.stages.0.lr.max: Input should be greater than 0"]),
        ("[0.1, -1]", ["train.stages.0.lr.1: Input should be greater than 0"]),
        (
            "{mx: 1}",
            [
                "train.stages.0.lr.max: required key is missing",
                "train.stages.0.lr.mx: unknown key; did you mean 'max'?",
            ],
        ),
    ],
)
def test_a_mapping_or_list_for_a_union_is_said_from_inside(tmp_path, folder_data, lr, said):
    # the number member's "Input should be a valid number" about the whole value came first
    p = write(tmp_path, tiny_config(folder_data, stages=f"\n    - {{epochs: 1, lr: {lr}}}"))
    assert error_of(p).splitlines() == [f"{p}:7: {line}" for line in said]


def test_a_misspelt_word_where_a_number_or_a_word_goes_gets_did_you_mean(tmp_path, folder_data):
    # the number member's "unable to parse string as a number" came first, with no hint
    p = write(tmp_path, tiny_config(folder_data, stages="\n    - {epochs: 1, lr: auot}"))
    assert error_of(p).splitlines() == [
        f"{p}:7: train.stages.0.lr: Input should be a number or 'auto'; did you mean 'auto'?"
    ]
    p = write(tmp_path, tiny_config(folder_data).replace("train:\n", "train:\n  checkpoint_every: epoc\n"))
    assert "train.checkpoint_every: Input should be a number or 'epoch'; did you mean 'epoch'?" in error_of(p)


def test_unknown_arch_hint(tmp_path, folder_data):
    p = write(tmp_path, tiny_config(folder_data, arch="bnresnett"))
    msg = error_of(p)
    assert f"{p}:4: model.arch: unknown architecture 'bnresnett'; did you mean 'bnresnet'?" in msg


def test_option_the_arch_does_not_take(tmp_path, folder_data):
    p = write(tmp_path, tiny_config(folder_data).replace("arch: convnet2", "arch: convnet2, n_hidden: 5"))
    assert "model.n_hidden: 'convnet2' does not take this option" in error_of(p)


def test_arch_must_fit_the_data_layout(tmp_path, folder_data, text_file):
    p = write(tmp_path, tiny_config(folder_data, arch="gru"))
    assert f"{p}:4: model.arch: 'gru' does not fit data.layout: folder; an image model does" in error_of(p)
    p = write(
        tmp_path,
        f"name: t\ndata: {{layout: text, path: '{text_file}'}}\nmodel: {{arch: bnresnet}}\n"
        "train: {stages: [{epochs: 1, lr: 0.01}]}\n",
    )
    assert (
        "model.arch: 'bnresnet' does not fit data.layout: text; a character model does (charrnn, gru, lstm)"
        in error_of(p)
    )


def test_a_fixed_size_model_with_progressive_resizing_fails_before_training(tmp_path, folder_data):
    stages = "[{epochs: 1, lr: 0.01, size: 16}, {epochs: 1, lr: 0.01, size: 24}]"
    p = write(tmp_path, tiny_config(folder_data, arch="simplenet", stages=stages))
    assert "train.stages: 'simplenet' is built for one input size, but the stages use sizes 16, 24" in error_of(p)


def test_missing_data_path(tmp_path):
    p = write(tmp_path, tiny_config(tmp_path / "nope"))
    assert "data.path:" in error_of(p) and "does not exist" in error_of(p)


def test_empty_stage_list_and_bad_literal(tmp_path, folder_data):
    p = write(tmp_path, tiny_config(folder_data, stages="[]"))
    assert "train.stages: List should have at least 1 item" in error_of(p)
    p = write(tmp_path, tiny_config(folder_data).replace("layout: folder", "layout: foldr"))
    assert "did you mean 'folder'?" in error_of(p)


def test_overrides_apply_and_errors_name_the_flag(tmp_path, folder_data):
    p = write(tmp_path, tiny_config(folder_data))
    cfg = load_config(p, ["data.bs=64", "train.stages.0.epochs=1", "train.stages.0.lr=[1e-3, 1e-2]"])
    assert cfg.data.bs == 64 and cfg.train.stages[0].epochs == 1 and cfg.train.stages[0].lr == [1e-3, 1e-2]
    msg = error_of(p, ["data.bss=3"])
    assert "--set data.bss=3: data.bss: unknown key; did you mean 'bs'?" in msg
    assert "no such list item" in error_of(p, ["train.stages.5.lr=1"])


def test_not_yaml_and_not_a_mapping(tmp_path):
    assert "not valid YAML" in error_of(write(tmp_path, "a: [1, 2"))
    assert "must be a mapping" in error_of(write(tmp_path, "- 1\n- 2\n"))


def test_cli_check_prints_resolved_config_and_errors_exit_2(tmp_path, folder_data):
    p = write(tmp_path, tiny_config(folder_data))
    res = runner.invoke(app, ["check", str(p)])
    assert res.exit_code == 0, res.output
    assert "pct_start: 0.25" in res.output and "seed: 0" in res.output
    bad = write(tmp_path, tiny_config(folder_data).replace("seed: 0", "sed: 0"), "bad.yaml")
    res = runner.invoke(app, ["check", str(bad)])
    assert res.exit_code == 2
    assert "sed: unknown key; did you mean 'seed'?" in res.output
    assert "Traceback" not in res.output


def test_cli_schema_is_json():
    res = runner.invoke(app, ["schema"])
    assert res.exit_code == 0
    schema = json.loads(res.output)
    assert "train" in schema["properties"]


# ---- YAML's words and empty values ----------------------------------------------------------


@pytest.mark.parametrize("word", ["off", "on", "yes", "no", "y", "n", "Off", "NO"])
def test_yaml_words_stay_words(tmp_path, folder_data, word):
    from trainer.config import parse_yaml

    assert parse_yaml(f"a: {word}\nb: true\nc: False\n")[0] == {"a": word, "b": True, "c": False}
    p = write(tmp_path, tiny_config(folder_data) + "amp: off\n")
    assert load_config(p).amp == "off"
    assert load_config(write(tmp_path, tiny_config(folder_data), "d.yaml"), ["amp=off"]).amp == "off"
    assert load_config(p, ["compile=yes"]).compile is True  # a boolean key still takes the words


def test_an_empty_value_says_so_and_what_the_key_holds(tmp_path, folder_data, csv_data):
    p = write(tmp_path, tiny_config(folder_data))
    assert error_of(p, ["data.bs="]).endswith("--set data.bs=: data.bs: is empty; give a value")
    text = tiny_config(csv_data, layout="csv", data_extra=", suffix: ")
    msg = error_of(write(tmp_path, text, "e.yaml"))
    assert "data.suffix: is empty; give a value; the ending added to each id to name its image file" in msg
    cfg = load_config(write(tmp_path, tiny_config(csv_data, layout="csv"), "f.yaml"), ["data.suffix="])
    assert cfg.data.suffix == ""  # --set KEY= is the empty word: no suffix


def test_a_set_inside_a_failing_section_is_named(tmp_path, folder_data):
    p = write(tmp_path, tiny_config(folder_data))
    assert error_of(p, ["train.nesterov=true"]).startswith("--set train.nesterov=true: train: nesterov needs")
