"""Character-level language models: vocabulary, streams, stateful models, generation, the CLI."""

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from trainer.cli import app
from trainer.config import load_config
from trainer.data.items import DataError
from trainer.data.text import UNK, TextStreams, Vocab, build_text_bundle, draw_lengths, streams
from trainer.inference.generate import generate
from trainer.models import create_model
from trainer.run.rundir import read_table
from trainer.train.plan import CONFIG_CHECKS

runner = CliRunner()


def text_config(
    path, arch="gru", model="n_fac: 8, n_hidden: 32", stages="[{epochs: 2, lr: 1.0e-2}]", data="bs: 4, bptt: 10", **_
):
    return (
        f"name: lm\nseed: 0\ndata: {{layout: text, path: '{path}', {data}}}\n"
        f"model: {{arch: {arch}, {model}}}\ntrain:\n  clip: 0.5\n  stages: {stages}\n"
    )


def load(tmp_path, text, sets=()):
    p = tmp_path / "lm.yaml"
    p.write_text(text)
    return load_config(p, sets, checks=CONFIG_CHECKS)


# --- vocabulary -------------------------------------------------------------------------------


def test_vocab_round_trips_and_maps_unseen_characters_to_unk():
    v = Vocab.from_text("hello world")
    assert v.itos[0] == UNK and list(v.itos[1:]) == sorted(set("hello world"))
    assert v.decode(v.encode("hello").tolist()) == "hello"
    ids = v.encode("hZé🙂o")  # unseen ASCII, accented and astral characters
    assert ids.tolist() == [v.itos.index("h"), 0, 0, 0, v.itos.index("o")]
    assert Vocab.from_json(json.loads(json.dumps(v.to_json()))) == v


def test_validation_vocab_comes_from_training_text_only(tmp_path):
    train, valid = tmp_path / "t.txt", tmp_path / "v.txt"
    train.write_text("abcabcabc" * 20)
    valid.write_text("abcxyz" * 20)
    cfg = load(tmp_path, text_config(train, data=f"bs: 4, bptt: 5, valid_path: '{valid}'"))
    b = build_text_bundle(cfg, 0, torch.device("cpu"), log=lambda m: None)
    assert list(b.vocab.itos) == [UNK, "a", "b", "c"]
    assert (b.valid_ids == 0).sum() == 60  # x, y, z
    assert b.files_to_save()["vocab.json"]["itos"] == [UNK, "a", "b", "c"]


def test_valid_pct_splits_at_the_end(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("a" * 90 + "b" * 10)
    cfg = load(tmp_path, text_config(p, data="bs: 2, bptt: 5, valid_pct: 0.1"))
    b = build_text_bundle(cfg, 0, torch.device("cpu"), log=lambda m: None)
    assert b.vocab.decode(b.train_ids.tolist()) == "a" * 90
    assert (b.valid_ids == 0).all() and len(b.valid_ids) == 10  # "b" is unseen in training: UNK


def test_text_too_short_for_the_streams_is_a_clear_error(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("abcdefghij" * 3)
    cfg = load(tmp_path, text_config(p, data="bs: 64, bptt: 5"))
    b = build_text_bundle(cfg, 0, torch.device("cpu"), log=lambda m: None)
    with pytest.raises(DataError, match="lower data.bs"):
        b.loaders(64)
    b.smoke = True  # a smoke run on a tiny CI text uses fewer streams instead
    train, valid = b.loaders(64)
    assert len(train) >= 1 and len(valid) >= 1


def test_missing_valid_path_fails_at_config_time(tmp_path, text_file):
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="data.valid_path"):
        load(tmp_path, text_config(text_file, data=f"bs: 4, bptt: 5, valid_path: '{tmp_path / 'nope.txt'}'"))


# --- streams and batches ----------------------------------------------------------------------


def test_fastai_sequence_length_distribution():
    lengths = draw_lengths(np.random.default_rng(0), 70, 20_000)
    assert lengths.min() >= 5
    near_full = np.abs(lengths - 70) < 20
    assert 0.9 < near_full.mean() < 0.97  # 95% drawn around bptt (a few fall outside 4 sigma)
    assert 0.02 < (np.abs(lengths - 35) < 15).mean() < 0.08  # 5% around bptt/2
    assert 66 < lengths.mean() < 69


def epoch_batches(dl, epoch, start=0):
    dl.set_epoch(epoch)
    return [(i, x.clone(), y.clone()) for i, x, y in dl.iterate(start)]


def test_streams_cover_the_text_once_per_epoch_with_targets_shifted_by_one():
    ids = torch.arange(1, 4001)
    data = streams(ids, 8)
    assert data.shape == (500, 8) and data[:, 1].tolist() == list(range(501, 1001))
    dl = TextStreams(data, bptt=20, seed=3, variable=True)
    lens = set()
    for epoch in range(3):
        batches = epoch_batches(dl, epoch)
        assert len(batches) == len(dl)  # every epoch has the same number of batches
        xs = torch.cat([x for _, x, _ in batches])
        ys = torch.cat([y for _, _, y in batches])
        assert torch.equal(xs, data[:-1]) and torch.equal(ys, data[1:])  # contiguous, y = next char
        lens.add(tuple(x.shape[0] for _, x, _ in batches))
        assert all(x.shape[1] == 8 for _, x, _ in batches)
    assert len(lens) == 3  # the lengths are drawn again each epoch


def test_batches_are_a_pure_function_of_seed_epoch_and_index():
    data = streams(torch.arange(6000), 4)
    a, b = TextStreams(data, 30, seed=1, variable=True), TextStreams(data, 30, seed=1, variable=True)
    full = epoch_batches(a, 2)
    resumed = epoch_batches(b, 2, start=7)
    assert [i for i, _, _ in resumed] == list(range(7, len(a)))
    for (i, x, y), (j, x2, y2) in zip(full[7:], resumed, strict=True):
        assert i == j and torch.equal(x, x2) and torch.equal(y, y2)
    other = epoch_batches(TextStreams(data, 30, seed=2, variable=True), 2)
    assert [x.shape[0] for _, x, _ in other] != [x.shape[0] for _, x, _ in full]


def test_validation_uses_fixed_bptt_and_honours_the_limit():
    dl = TextStreams(streams(torch.arange(1000), 4), 30)
    shapes = [x.shape for x in (b[0] for b in dl)]
    assert all(s == (30, 4) for s in shapes[:-1]) and shapes[-1][0] == 249 - 30 * 8
    dl.limit = 2
    assert len(dl) == 2 and len(list(dl)) == 2


# --- models -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,opts",
    [
        ("charrnn", {}),
        ("gru", {"n_layers": 2, "dropout": 0.3}),
        ("lstm", {"n_layers": 2, "dropout": 0.5}),
        ("lstm", {"n_layers": 1}),
    ],
)
def test_stateful_model_carries_state_exactly(arch, opts):
    from trainer.config.schema import ModelConfig

    torch.manual_seed(0)
    m = create_model(ModelConfig(arch=arch, n_fac=6, n_hidden=12, **opts), 20, 0, 0).model.eval()
    x = torch.randint(1, 20, (15, 3))
    m.reset()
    whole = m(x)
    assert whole.shape == (15, 3, 20)
    m.reset()
    pieces = torch.cat([m(x[:4]), m(x[4:5]), m(x[5:])])
    torch.testing.assert_close(pieces, whole, atol=1e-5, rtol=1e-5)  # batch boundaries change nothing
    m.reset()
    assert not torch.allclose(m(x[5:]), whole[5:], atol=1e-3)  # and the state matters


def test_hidden_state_is_detached_between_batches_and_reset_on_a_new_batch_size():
    from trainer.config.schema import ModelConfig

    m = create_model(ModelConfig(arch="lstm", n_fac=6, n_hidden=12), 20, 0, 0).model
    m(torch.randint(1, 20, (5, 3))).sum().backward()
    assert all(t.grad_fn is None and not t.requires_grad for t in m.h)
    m(torch.randint(1, 20, (5, 3))).sum().backward()  # would fail if the graph reached batch 1
    assert m(torch.randint(1, 20, (5, 2))).shape == (5, 2, 20)


def test_arch_options_are_checked(tmp_path, text_file):
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="model.n_layers: 'charrnn' does not take this option"):
        load(tmp_path, text_config(text_file, arch="charrnn", model="n_layers: 2"))


# --- generation -------------------------------------------------------------------------------


class CountingModel(torch.nn.Module):
    """Wraps a char model and counts the positions fed to it."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.fed = inner, 0

    def reset(self):
        self.inner.reset()

    def forward(self, x):
        self.fed += x.numel()
        return self.inner(x)


def test_generation_is_linear_greedy_at_zero_and_seeded():
    from trainer.config.schema import ModelConfig

    torch.manual_seed(0)
    vocab = Vocab.from_text("abcdefgh ")
    m = CountingModel(create_model(ModelConfig(arch="gru", n_fac=4, n_hidden=8), len(vocab), 0, 0).model)
    out = generate(m, vocab, "abc", 50, temperature=0.0)
    assert out.startswith("abc") and len(out) == 53 and UNK not in out and "\ufffd" not in out
    assert m.fed == 3 + 50 - 1  # the prime once, then one character per step: linear
    assert generate(m, vocab, "abc", 50, temperature=0.0) == out
    # greedy equals the argmax of re-running the whole text (the carried state is right)
    m.inner.reset()
    logits = m.inner(vocab.encode(out[:-1]).view(-1, 1))[:, 0]
    logits[:, 0] = -math.inf
    assert vocab.decode(logits.argmax(-1)[2:].tolist()) == out[3:]
    s1, s2 = (generate(m, vocab, "abc", 40, 1.0, seed=5) for _ in range(2))
    assert s1 == s2 and s1 != generate(m, vocab, "abc", 40, 1.0, seed=6)
    assert generate(m, vocab, "xyz", 5, 0.8, seed=1).startswith("xyz")  # unseen prime: no crash
    with pytest.raises(ValueError, match="prime"):
        generate(m, vocab, "", 5)


# --- the whole pipeline through the CLI -------------------------------------------------------


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, text_file):
    tmp = tmp_path_factory.mktemp("lm")
    cfg = tmp / "lm.yaml"
    cfg.write_text(
        text_config(
            text_file, data="bs: 8, bptt: 12", model="n_fac: 8, n_hidden: 48", stages="[{epochs: 3, lr: 1.0e-2}]"
        )
    )
    res = runner.invoke(app, ["fit", str(cfg), "--out", str(tmp / "run")])
    assert res.exit_code == 0, res.output
    return tmp / "run"


def test_fit_records_nats_bits_and_accuracy(lm_run):
    rows = read_table(lm_run / "metrics.csv")
    assert len(rows) == 3
    for r in rows:
        assert float(r["bpc"]) == pytest.approx(float(r["valid_loss"]) / math.log(2), rel=1e-4)
    assert float(rows[-1]["valid_loss"]) < 1.5  # the corpus repeats: an uniform guess is ~3.4 nats
    assert float(rows[-1]["accuracy"]) > 0.5
    vocab = json.loads((lm_run / "vocab.json").read_text())
    assert vocab["itos"][0] == UNK and "w" in vocab["itos"]


def test_generate_command_prints_prime_and_chars(lm_run):
    res = runner.invoke(
        app, ["generate", str(lm_run), "--prime", "for thos", "--chars", "60", "--temperature", "0", "--seed", "1"]
    )
    assert res.exit_code == 0, res.output
    text = res.output.rstrip("\n")
    assert text.startswith("for thos") and len(text) == 68
    assert "e who think" in text  # greedy continues the corpus' phrase
    res = runner.invoke(app, ["generate", str(lm_run), "--prime", "", "--chars", "5"])
    assert res.exit_code == 2 and "prime" in res.output


def test_predict_on_a_text_run_points_to_generate(lm_run, folder_data):
    res = runner.invoke(app, ["predict", str(lm_run), "--data", str(folder_data / "test")])
    assert res.exit_code == 2 and "trainer generate" in res.output


def test_summary_of_a_text_config(tmp_path, text_file):
    p = tmp_path / "lm.yaml"
    p.write_text(text_config(text_file, arch="charrnn"))
    res = runner.invoke(app, ["summary", str(p)])
    assert res.exit_code == 0, res.output
    assert res.output.count("RNNCell") == 1 and "Embedding" in res.output


def test_text_config_smoke_writes_the_vocabulary(text_file, tmp_path):
    # every config is smoke-run by tests/test_configs_smoke.py; this one checks the LM run's vocab file
    res = runner.invoke(
        app,
        [
            "fit",
            "configs/nietzsche_gru.yaml",
            "--smoke",
            "--set",
            f"data.path={text_file}",
            "--set",
            "data.bs=4",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "smoke run passed" in res.output
    assert (tmp_path / "run" / "vocab.json").is_file()


def test_a_corpus_with_a_byte_order_mark_is_read_once_without_it(tmp_path, text_file):
    """Notepad writes UTF-8 with a BOM: it is not a character of the text, in training or in vocab.json."""
    corpus = tmp_path / "bom.txt"
    corpus.write_bytes(b"\xef\xbb\xbf" + text_file.read_bytes())
    load(tmp_path, text_config(corpus, stages="[{epochs: 1, lr: 1.0e-2}]"))  # writes lm.yaml
    res = runner.invoke(app, ["fit", str(tmp_path / "lm.yaml"), "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    itos = json.loads((tmp_path / "run" / "vocab.json").read_text(encoding="utf-8"))["itos"]
    assert "\ufeff" not in itos and set(itos[1:]) <= set(text_file.read_text(encoding="utf-8"))


def test_state_is_reset_at_each_epoch_and_before_validation(tmp_path, text_file):
    from tests.playbook_util import prepare
    from trainer.run.learner import stage_learner
    from trainer.train.loop import Callback

    cfg = load(tmp_path, text_config(text_file))
    sess = prepare(cfg, tmp_path / "run")
    seen = []

    class Spy(Callback):
        order = 0  # after ResetState (-20)

        def before_epoch(self, learn):
            seen.append(learn.model.h is None)

    sess.extra_callbacks.append(Spy())
    learn, _ = stage_learner(sess, sess.plan.stages[0])
    learn.fit(2)
    assert seen == [True, True]
    first = learn.validate()
    learn.model.train()
    learn.model(torch.randint(1, 10, (7, 4)))  # leaves a training state behind
    assert learn.validate() == first  # validation starts from a zero state, whatever came before


@pytest.mark.parametrize("crash_at", [5, 9])  # mid-epoch in epoch 1 and in epoch 2
def test_a_resumed_language_model_run_equals_the_uninterrupted_one(tmp_path, text_file, crash_at):
    """The training streams' hidden state is checkpointed: a crash mid-epoch and a resume give the
    same metrics and bitwise the same weights."""
    from tests.runs import Crash, CrashAt, assert_same_run
    from trainer import storage as checkpoint
    from trainer.run import fit as spine

    text = (
        text_config(text_file, model="n_fac: 8, n_hidden: 16", data="bs: 4, bptt: 10", arch="lstm")
        + "  checkpoint_every: 1\n"
    )
    # 16 lines of the corpus: 8 training batches an epoch, so the crashes fall in epochs 1 and 2
    short = tmp_path / "short.txt"
    short.write_text("\n".join(text_file.read_text().splitlines()[:16]), encoding="utf-8")
    cfg = load(tmp_path, text.replace(str(text_file), str(short)))
    spine.fit(cfg, tmp_path / "reference")
    with pytest.raises(Crash):
        spine.fit(cfg, tmp_path / "run", callbacks=[CrashAt(crash_at)])
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["batch"]) == ((0, 5) if crash_at == 5 else (1, 1))
    spine.fit(cfg, resume=tmp_path / "run")
    assert_same_run(tmp_path / "reference", tmp_path / "run")
