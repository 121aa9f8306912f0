"""Security: checkpoints are data, never code; configs are data, never code; export for deployment."""

import ast
import json
import pathlib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import tiny_config
from trainer import storage as checkpoint
from trainer.cli import app

runner = CliRunner()
PACKAGE = Path(__file__).resolve().parents[1] / "trainer"


class Payload:
    """Unpickling this calls Path.touch(marker): a stand-in for os.system("anything")."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def hostile_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"model": {"w": torch.zeros(2)}, "payload": Payload(marker)}, path)
    return path


def test_a_checkpoint_carrying_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = hostile_checkpoint(tmp_path / "last.pt", marker)
    with pytest.raises(ValueError, match="refused to load the checkpoint"):
        checkpoint.load(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: plain unpickling runs it
    assert marker.exists()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, folder_data):
    tmp = tmp_path_factory.mktemp("sec")
    cfg = tmp / "c.yaml"
    cfg.write_text(
        tiny_config(folder_data, arch="bnresnet", stages="[{epochs: 1, lr: 1.0e-2}]").replace(
            "arch: bnresnet", "arch: bnresnet, layers: [8, 16]"
        )
    )
    res = runner.invoke(app, ["fit", str(cfg), "--out", str(tmp / "run")])
    assert res.exit_code == 0, res.output
    return tmp / "run"


def test_predict_and_resume_refuse_a_hostile_checkpoint(run_dir, folder_data, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    marker = tmp_path / "pwned"
    hostile_checkpoint(run / "checkpoints" / "best.pt", marker)
    res = runner.invoke(app, ["predict", str(run), "--data", str(folder_data / "test")])
    assert res.exit_code == 2 and "refused to load the checkpoint" in res.output, res.output
    (run / "status.json").write_text('{"status": "interrupted"}')
    hostile_checkpoint(run / "checkpoints" / "last.pt", marker)
    cfg = tmp_path / "c.yaml"
    cfg.write_text((run / "config.yaml").read_text())
    res = runner.invoke(app, ["fit", str(cfg), "--resume", str(run)])
    assert res.exit_code == 2 and "refused to load the checkpoint" in res.output, res.output
    assert not marker.exists()


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = (
                f.id
                if isinstance(f, ast.Name)
                else f"{getattr(f.value, 'id', '?')}.{f.attr}"
                if isinstance(f, ast.Attribute)
                else "?"
            )
            yield name, node


def test_no_code_from_data_anywhere_in_the_package():
    """No eval/exec, no import by string, no pickle or unsafe YAML, and every torch.load says
    weights_only=True: a config or a checkpoint can only ever be data."""
    banned = {
        "eval",
        "exec",
        "compile",
        "__import__",
        "importlib.import_module",
        "pickle.load",
        "pickle.loads",
        "yaml.load",
        "yaml.unsafe_load",
        "yaml.full_load",
        "yaml.load_all",
        "marshal.loads",
        "dill.load",
    }
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for name, node in _calls(tree):
            where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
            if name in banned:
                problems.append(f"{where}: {name}")
            if name == "torch.load":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                # datasets/formats.py reads the official CIFAR pickles through an allow-list unpickler
                allowed = path.relative_to(PACKAGE).as_posix() == "datasets/formats.py"
                if any(n in ("pickle", "dill", "marshal", "importlib") for n in names) and not allowed:
                    problems.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: imports {names}")
    assert problems == []


def test_the_checker_itself_catches_what_it_bans(tmp_path):
    tree = ast.parse("import torch, yaml\ntorch.load(f)\nyaml.load(s)\neval('1')\n")
    found = [name for name, _ in _calls(tree)]
    assert {"torch.load", "yaml.load", "eval"} <= set(found)


# ---- export -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript", "onnx"])
def test_export_reproduces_the_model(run_dir, tmp_path, fmt):
    from trainer.inference.export import FORMATS, sample_input
    from trainer.inference.finished import load_run

    out = tmp_path / f"model{FORMATS[fmt]}"
    res = runner.invoke(app, ["export", str(run_dir), "--format", fmt, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "verified, max |difference|" in res.output
    run = load_run(run_dir, "best", device="cpu")
    x = sample_input(run, 3)  # another batch size than the export's sample
    with torch.no_grad():
        expected = run.built.model(x)
    if fmt == "safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(out), "pt") as f:
            meta = json.loads(f.metadata()["trainer"])
        weights = load_file(str(out))
        state = run.built.model.state_dict()
        assert set(weights) == set(state) and all(torch.equal(weights[k], state[k]) for k in weights)
    elif fmt == "torchscript":
        extra = {"trainer.json": ""}
        got = torch.jit.load(str(out), _extra_files=extra)(x)
        meta = json.loads(extra["trainer.json"])
        assert torch.allclose(got, expected, atol=1e-5)
    else:
        import onnx
        from onnx.reference import ReferenceEvaluator

        proto = onnx.load(str(out))
        onnx.checker.check_model(proto)
        meta = json.loads({p.key: p.value for p in proto.metadata_props}["trainer"])
        got = torch.from_numpy(ReferenceEvaluator(proto).run(None, {"input": x.numpy()})[0])
        assert torch.allclose(got, expected, atol=1e-4)
    assert meta["classes"] == ["circle", "square", "stripe"] and meta["size"] == 16 and len(meta["mean"]) == 3


def test_export_default_path_and_last_checkpoint(run_dir):
    res = runner.invoke(app, ["export", str(run_dir), "--checkpoint", "last"])
    assert res.exit_code == 0, res.output
    assert (run_dir / "export" / "model.safetensors").is_file()
