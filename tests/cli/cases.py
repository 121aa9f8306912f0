"""The bad-input harness: a case builds what it needs in a fresh folder and returns a command line;
running it must give the exit code and the messages, never a traceback, never code run from data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml
from typer.testing import CliRunner

from tests.conftest import make_csv_dataset, make_folder_dataset, tiny_config
from trainer.cli import app

runner = CliRunner()


def registry() -> tuple[dict, object]:
    """A dict of cases and the decorator that fills it: @case(exit code, *messages the output holds)."""
    cases: dict = {}

    def case(code: int, *messages: str):
        def deco(fn):
            cases[fn.__name__] = (fn, code, messages)
            return fn

        return deco

    return cases, case


def folder(tmp: Path) -> Path:
    return make_folder_dataset(tmp / "data", n_train=4, n_valid=2)


def csv(tmp: Path, rows: list[str] | None = None) -> Path:
    root = make_csv_dataset(tmp / "data", n=12)
    if rows is not None:
        (root / "labels.csv").write_text("\n".join(["id,label", *rows]) + "\n")
    return root


def config(tmp: Path, data: Path | str, text: str | None = None, **over) -> Path:
    path = tmp / "c.yaml"
    over.setdefault("stages", "[{epochs: 1, lr: 1.0e-2}]")
    path.write_text(text if text is not None else tiny_config(data, **over))
    return path


def fit(tmp: Path, data: Path | str, *extra: str, **over) -> list[str]:
    return ["fit", str(config(tmp, data, **over)), "--out", str(tmp / "run"), *extra]


def fit_csv(tmp: Path, data: Path, extra: str = "") -> list[str]:
    return fit(tmp, data, layout="csv", data_extra=", suffix: .jpg" + extra)


def text_fit(tmp: Path, corpus: Path, extra: str = "") -> list[str]:
    text = (
        f"name: lm\nseed: 0\ndata: {{layout: text, path: '{corpus}', bptt: 8{extra}}}\n"
        "model: {arch: gru}\ntrain:\n  stages: [{epochs: 1, lr: 1.0e-3}]\n"
    )
    return ["fit", str(config(tmp, corpus, text=text)), "--out", str(tmp / "run")]


def first(root: Path, part: str = "train", cls: str = "circle") -> Path:
    return sorted((root / part / cls).iterdir())[0]


def fake_run(tmp: Path, last: bytes | None = None) -> tuple[Path, Path]:
    d = folder(tmp)
    cfg = config(tmp, d)
    run = tmp / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(yaml.safe_load(cfg.read_text())))
    (run / "classes.json").write_text('{"classes": ["circle", "square", "stripe"], "multi_label": false}')
    (run / "stats.json").write_text('{"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "size": 16, "channels": 3}')
    if last is not None:
        (run / "checkpoints" / "last.pt").write_bytes(last)
    return cfg, run


def check(entry: tuple, name: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    build, code, messages = entry
    argv = build(tmp_path)
    made = argv[:1] == ["fit"] and "--out" in argv and not Path(argv[argv.index("--out") + 1]).exists()
    res = runner.invoke(app, argv)
    assert res.exit_code == code, f"{name}: exit {res.exit_code}\n{res.output}"
    assert res.exception is None or isinstance(res.exception, SystemExit), f"{name}: {res.exception!r}"
    assert "Traceback" not in res.output
    for m in messages:
        assert m in res.output, f"{name}: {m!r} not in\n{res.output}"
    assert not (tmp_path / "pwned").exists()
    out = Path(argv[argv.index("--out") + 1]) if made else None
    if out is not None and code == 2 and out.exists():  # refused: no folder, or a run failed with its cause
        status = json.loads((out / "status.json").read_text()) if (out / "status.json").exists() else {}
        assert status.get("status") == "failed", f"{name}: left {out} holding {sorted(os.listdir(out))}"
