"""Export a trained image classifier for deployment: safetensors, ONNX or TorchScript.

Each file carries what a deployment needs besides the weights, as JSON metadata: the classes,
the input size and channels, and the normalisation mean and std. The export is checked by
loading it back and comparing its outputs with the model's on a sample batch.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.inference.finished import LoadedRun, load_run
from trainer.models import create_model
from trainer.storage import OutputError, writable_file

FORMATS = {"safetensors": ".safetensors", "onnx": ".onnx", "torchscript": ".pt"}


@dataclass
class Exported:
    path: Path
    format: str
    size_bytes: int
    max_diff: float | None


def metadata(run: LoadedRun) -> dict:
    return {
        "arch": run.cfg.model.arch,
        "model": run.cfg.model.model_dump(mode="json"),
        "classes": run.classes,
        "multi_label": run.multi_label,
        "size": run.size,
        "channels": run.stats["channels"],
        "mean": run.stats["mean"],
        "std": run.stats["std"],
        "input": "float32 NCHW, pixels/255 then (x-mean)/std",
    }


def sample_input(run: LoadedRun, n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, run.stats["channels"], run.size, run.size, generator=g)


def export_run(
    run_dir: str | Path, fmt: str, out: str | Path | None = None, which: str = "best", verify: bool = True
) -> Exported:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format '{fmt}' (expected one of {', '.join(FORMATS)})")
    path = writable_file(Path(out) if out is not None else Path(run_dir) / "export" / f"model{FORMATS[fmt]}")
    if path.exists() and not an_export(path):
        raise OutputError(
            f"{path}: exists and is not an export of trainer; give another path or remove it (nothing was replaced)"
        )
    run = load_run(run_dir, which, device="cpu")
    model = run.built.model.eval()
    x = sample_input(run)
    with torch.no_grad():
        expected = model(x)
    # written and checked under a temporary name, then renamed: a failure never leaves half a file at `path`
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        {"safetensors": _safetensors, "onnx": _onnx, "torchscript": _torchscript}[fmt](run, model, x, tmp)
        diff = _check(run, fmt, tmp, x, expected) if verify else None
        size = tmp.stat().st_size
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"{path}: could not write the export ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return Exported(path, fmt, size, diff)


def an_export(path: Path) -> bool:
    """Whether the file carries our "trainer" metadata (an earlier export, ours to replace), in any
    of the three formats; read as data only, never run."""
    return any(_quietly(has_mark, path) for has_mark in (_torchscript_mark, _safetensors_mark, _onnx_mark))


def _quietly(has_mark, path: Path) -> bool:
    try:
        return has_mark(path)
    except Exception:  # noqa: BLE001 - a file of another format fails each reader its own way: not this format
        return False


def _torchscript_mark(path: Path) -> bool:
    # a TorchScript file is a zip archive; its extra files sit under <archive>/extra/
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("/extra/trainer.json") for name in z.namelist())


def _safetensors_mark(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return "trainer" in (f.metadata() or {})


def _onnx_mark(path: Path) -> bool:
    import onnx  # absent without the export extra: then no file can be told ours

    proto = onnx.load(str(path), load_external_data=False)
    return any(p.key == "trainer" for p in proto.metadata_props)


def _check(run: LoadedRun, fmt: str, path: Path, x: torch.Tensor, expected: torch.Tensor) -> float:
    """The export loaded back and run on the sample: its largest difference from the model."""
    reload = {"safetensors": _reload_safetensors, "onnx": _run_onnx, "torchscript": _run_torchscript}[fmt]
    diff = (reload(run, path, x) - expected).abs().max().item()
    if not diff <= 1e-3 * max(1.0, expected.abs().max().item()):
        raise RuntimeError(f"export check failed: the export gives outputs up to {diff:.3g} away from the model's")
    return diff


def _safetensors(run: LoadedRun, model, x, path: Path) -> None:
    from safetensors.torch import save_model

    save_model(model, str(path), metadata={"trainer": json.dumps(metadata(run))})


def _reload_safetensors(run: LoadedRun, path: Path, x) -> torch.Tensor:
    from safetensors import safe_open
    from safetensors.torch import load_model

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["trainer"])
    fresh = create_model(
        run.cfg.model.model_copy(update={"pretrained": False}), len(meta["classes"]), meta["channels"], meta["size"]
    ).model
    load_model(fresh, str(path))
    with torch.no_grad():
        return fresh.eval()(x)


def _onnx(run: LoadedRun, model, x, path: Path) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401  (the exporter behind torch.onnx.export)
    except ImportError as e:
        raise ValueError(
            f"--format onnx needs the onnx and onnxscript packages ({e}): pip install 'trainer[export]'"
        ) from None
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.5e9  # protobuf's 2 GB limit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model,
                (x,),
                str(path),
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                external_data=big,
                verbose=False,
            )
        except Exception as e:  # noqa: BLE001 - the exporter raises many kinds; say which model failed
            raise RuntimeError(f"ONNX export of '{run.cfg.model.arch}' failed: {str(e).splitlines()[0]}") from None
    if not big:
        import onnx

        proto = onnx.load(str(path))
        proto.metadata_props.add(key="trainer", value=json.dumps(metadata(run)))
        onnx.save(proto, str(path))


def _run_onnx(run: LoadedRun, path: Path, x) -> torch.Tensor:
    try:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    except ImportError:  # onnx's own reference runtime: slower, but always there with onnx
        from onnx.reference import ReferenceEvaluator

        return torch.from_numpy(ReferenceEvaluator(str(path)).run(None, {"input": x.numpy()})[0])


def _torchscript(run: LoadedRun, model, x, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream; it still serves C++ deployments
        traced = torch.jit.trace(model, x)
        torch.jit.save(traced, str(path), _extra_files={"trainer.json": json.dumps(metadata(run))})


def _run_torchscript(run: LoadedRun, path: Path, x) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return loaded(x)
