"""Property-based fuzzing of the whole CLI: random and mutated configs over small, sometimes
damaged data. Every outcome must be a clean run (exit 0) or a clean error (exit 2 with a
message; exit 1 with a message for a run that diverged or failed), never a traceback.

The number of examples is small and fixed (derandomized) so the suite stays fast and CI is
repeatable; for a deeper, new search each time run
TRAINER_FUZZ_EXAMPLES=500 python -m pytest tests/test_fuzz.py --hypothesis-show-statistics"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tests.conftest import make_folder_dataset
from trainer.cli import app

runner = CliRunner()
EXAMPLES = int(os.environ.get("TRAINER_FUZZ_EXAMPLES", "25"))
DEEP = "TRAINER_FUZZ_EXAMPLES" in os.environ  # a deeper search also explores new examples each time

# Plausible values per key (so many examples get as far as training), plus anything at all.
PLAUSIBLE = {
    "name": ["fz", "", "a/b", ".hidden", 3],
    "seed": [0, 1, -5, None, "x", 2**40],
    "device": ["cpu", "auto", "tpu", "cuda", "mps"],
    "amp": ["off", "bf16", "fp16", "auto", "fp8"],
    "deterministic": [True, False, "yes"],
    "channels_last": [True, False],
    "data.bs": [1, 2, 8, 64, 0, -1, "8"],
    "data.valid_bs": [1, 3, None, 0],
    "data.size": [8, 16, 24, None, 0],
    "data.channels": [1, 3, 2],
    "data.valid": ["valid", "train", "nope", "../valid"],
    "data.train": ["train", "valid", "nope"],
    "data.stats": ["auto", "none", "imagenet", [[0.5], [0.2]], [[0.5, 0.5, 0.5], [0.2, 0.2, 0.2]], [[0.5], [0]]],
    "data.on_bad_image": ["error", "skip", "ignore"],
    "data.layout": ["folder", "csv", "text", "zip"],
    "model.arch": ["convnet", "convnet2", "simplenet", "bnconvnet", "bnresnet", "resnet18", "nope", "__import__"],
    "model.layers": [[4, 8], [8], [], [0, 4], [4, 8, 16, 32]],
    "model.ps": [0.0, 0.5, 1.0, -0.1],
    "train.optimizer": ["adamw", "sgd", "lamb"],
    "train.wd": [0.0, 0.1, -1.0, 1e9],
    "train.clip": [None, 0.1, 0, 1e-30],
    "train.on_nan": ["stop", "skip", "ignore"],
    "train.checkpoint_every": [1, 2, "epoch", 0],
    "train.loss": ["auto", "cross_entropy", "bce", "mse"],
    "train.label_smoothing": [0.0, 0.1, 1.0],
    "train.momentum": [0.9, 0.0, 1.0],
    "train.betas": [[0.9, 0.99], [0.9], [2, 2]],
    "train.stages.0.epochs": [1, 2, 0, None],
    "train.stages.0.lr": [1e-2, 1e3, 1e30, 0, -1, [1e-3, 1e-2, 1e-1], [1e-3], {"max": 1e-2, "ratio": 3}, "auto"],
    "train.stages.0.schedule": ["one_cycle", "sgdr", "constant", "warmup_cosine", "step"],
    "train.stages.0.pct_start": [0.0, 0.3, 1.0, 2.0],
    "train.stages.0.div": [25.0, 1e-9, 1e9],
    "train.stages.0.n_cycles": [None, 1, 2],
    "train.stages.0.freeze": ["body", "none", None],
    "train.stages.0.freeze_to": [0, 1, 2, 5],
    "train.stages.0.size": [8, 12, 16, 32, 0],
    "train.stages.0.bs": [2, 8, 100],
    "train.stages.0.fine_tune": [None, {"freeze_epochs": 1}],
    "train.stages.1": [{"epochs": 1, "lr": 1e-3, "size": 8}, {"epochs": 1}, {}, "stage"],
    "transforms.preset": ["none", "side_on", "top_down", "pad_crop", "upside_down"],
    "transforms.max_zoom": [1.0, 1.5, 0.5],
    "transforms.max_rotate": [0.0, 45.0, 400.0],
    "transforms.pad": [None, 2, 100],
    "bogus": [1],
    "train.stages.0.lrr": [1e-3],
}
ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.integers(-1, 20), max_size=3),
    st.dictionaries(st.sampled_from(["max", "ratio", "x"]), st.floats(-1, 10), max_size=2),
)


@st.composite
def mutation(draw):
    key = draw(st.sampled_from(sorted(PLAUSIBLE)))
    op = draw(st.sampled_from(["plausible", "plausible", "any", "delete"]))
    value = draw(st.sampled_from(PLAUSIBLE[key])) if op == "plausible" else draw(ANY) if op == "any" else None
    return key, op, value


def apply(cfg: dict, key: str, op: str, value) -> None:
    parts = key.split(".")
    node = cfg
    for i, p in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            if not p.isdigit():
                return
            idx = int(p)
            if idx >= len(node):
                return
            node = node[idx]
        elif isinstance(node, dict):
            node = node.setdefault(p, [] if nxt.isdigit() else {})
        else:
            return
    last = parts[-1]
    if isinstance(node, list) and last.isdigit():
        if op == "delete" and int(last) < len(node):
            node.pop(int(last))
        elif op != "delete":
            node.append(value) if int(last) >= len(node) else node.__setitem__(int(last), value)
    elif isinstance(node, dict):
        if op == "delete":
            node.pop(last, None)
        else:
            node[last] = value


TEXT_EDITS = st.one_of(
    st.just(None), st.tuples(st.sampled_from(["cut", "insert", "drop_line"]), st.integers(0, 400), st.text(max_size=4))
)
DATA_EDITS = st.lists(
    st.tuples(st.sampled_from(["corrupt", "truncate", "empty", "remove", "junk_file"]), st.integers(0, 50)), max_size=2
)


def edit_text(text: str, edit) -> str:
    if edit is None:
        return text
    kind, at, s = edit
    at = at % max(1, len(text))
    if kind == "cut":
        return text[:at]
    if kind == "insert":
        return text[:at] + s + text[at:]
    lines = text.splitlines()
    del lines[at % len(lines)]
    return "\n".join(lines) + "\n"


def edit_data(root: Path, edits) -> None:
    files = sorted(root.rglob("*.png"))
    for kind, k in edits:
        f = files[k % len(files)]
        if not f.exists():
            continue
        if kind == "corrupt":
            raw = bytearray(f.read_bytes())
            if raw:
                raw[len(raw) // 2] ^= 0xFF
            f.write_bytes(bytes(raw))
        elif kind == "truncate":
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 3])
        elif kind == "empty":
            f.write_bytes(b"")
        elif kind == "remove":
            f.unlink()
        else:
            (f.parent / "readme.png").write_text("not an image")


@pytest.fixture(scope="module")
def base_data(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("fuzz") / "data", n_train=4, n_valid=2)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not DEEP,
    print_blob=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(mutations=st.lists(mutation(), max_size=4), text_edit=TEXT_EDITS, data_edits=DATA_EDITS)
def test_any_config_and_data_give_a_clean_outcome(base_data, mutations, text_edit, data_edits):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        shutil.copytree(base_data, data)
        edit_data(data, data_edits)
        cfg = {
            "name": "fz",
            "seed": 0,
            "data": {"layout": "folder", "path": str(data), "bs": 8},
            "model": {"arch": "convnet2", "layers": [4, 8]},
            "train": {"stages": [{"epochs": 1, "lr": 1e-2}]},
        }
        for key, op, value in mutations:
            apply(cfg, key, op, copy.deepcopy(value))
        text = edit_text(yaml.safe_dump(cfg, sort_keys=False), text_edit)
        (tmp / "c.yaml").write_text(text)
        cwd = os.getcwd()
        os.chdir(tmp)  # --resume/auto and default run folders stay inside the example's folder
        try:
            res = runner.invoke(app, ["fit", str(tmp / "c.yaml"), "--out", str(tmp / "run"), "--smoke"])
        finally:
            os.chdir(cwd)
    event(f"exit {res.exit_code}: {(res.output.strip().splitlines() or [''])[-1][:60]}")
    detail = f"\nconfig:\n{text}\ndata edits: {data_edits}\noutput:\n{res.output}"
    assert res.exception is None or isinstance(res.exception, SystemExit), f"{res.exception!r}{detail}"
    assert "Traceback" not in res.output, detail
    assert res.exit_code in (0, 1, 2), detail
    if res.exit_code == 0:
        assert "smoke run passed" in res.output, detail
    else:
        assert "error:" in res.output or ": " in res.output.strip().splitlines()[-1], detail
    if res.exit_code == 1:  # only a run that diverged, said plainly
        assert "not finite" in res.output, detail
