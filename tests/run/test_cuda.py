"""The CUDA paths: AMP (fp16 with the gradient scaler, bf16 without), exact resume with the scaler
and the GPU's random state, lr_find restoring the scaler, images kept on the GPU, compile with
progressive resizing, and DDP over NCCL. Skipped on machines without a GPU (CI has none); run
them on one with `python -m pytest tests/test_cuda.py`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.playbook_util import prepare
from tests.runs import Crash, CrashAt, assert_same_run, pythonpath, resumable_config, torchrun
from trainer import storage as checkpoint
from trainer.cli import app
from trainer.config import load_config
from trainer.run import fit as spine
from trainer.run.rundir import read_table

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
runner = CliRunner()


def cuda_config(tmp: Path, data: Path, amp: str, extra: str = "") -> Path:
    path = tmp / f"cuda-{amp}.yaml"
    path.write_text(
        resumable_config(data, name=f"cuda-{amp}") + f"device: cuda\namp: {amp}\ndeterministic: true\n{extra}"
    )
    return path


def finite_losses(run: Path) -> list[float]:
    rows = read_table(run / "metrics.csv")
    losses = [float(r["train_loss"]) for r in rows] + [float(r["valid_loss"]) for r in rows]
    assert rows and all(torch.isfinite(torch.tensor(losses))), rows
    return losses


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_amp_on_cuda_resumes_exactly(tmp_path, folder_data, amp):
    # fp16 carries a GradScaler whose scale and growth tracker a resume must restore; bf16 has none
    cfg_path = cuda_config(tmp_path, folder_data, amp)
    reference = spine.fit(load_config(cfg_path), tmp_path / "reference").run_dir
    finite_losses(reference)
    state = checkpoint.load(reference / "checkpoints" / "last.pt")
    if amp == "fp16":
        assert state["scaler"]["scale"] > 0 and "_growth_tracker" in state["scaler"]
    else:
        assert not state["scaler"]  # a disabled scaler saves nothing
    assert "device cuda" in (reference / "log.txt").read_text() and f"amp {amp}" in (reference / "log.txt").read_text()
    out = tmp_path / "run"
    with pytest.raises(Crash):
        spine.fit(load_config(cfg_path), out, callbacks=[CrashAt(6)])
    spine.fit(load_config(cfg_path), resume=out)
    assert_same_run(reference, out)


def test_lr_find_on_cuda_restores_weights_and_the_scaler(tmp_path, folder_data):
    from tests.conftest import tiny_config
    from tests.playbook_util import assert_same, learner_for, snapshot
    from trainer.train import lr_find as LF

    text = tiny_config(folder_data, arch="resnet18", stages="[{epochs: 1, lr: 1.0e-2, schedule: constant}]")
    sess = prepare(load_config(text=text, overrides=["device=cuda", "amp=fp16"]), tmp_path / "run")
    learn = learner_for(sess)
    learn.fit(1)
    assert learn.scaler.is_enabled()
    model0, opt0, scaler0 = snapshot(learn.model), snapshot(learn.opt), learn.scaler.state_dict()
    LF.lr_find(learn, 1e-5, 10.0, num_it=8)
    assert_same(model0, snapshot(learn.model))
    assert_same(opt0, snapshot(learn.opt))
    assert learn.scaler.state_dict() == scaler0


def test_images_on_the_gpu_give_the_same_batches_as_from_the_cpu(tmp_path, folder_data):
    from tests.conftest import tiny_config

    batches = {}
    for on in ("false", "true"):
        cfg = load_config(
            text=tiny_config(folder_data),
            overrides=["device=cuda", f"data.on_device={on}", "transforms.preset=side_on"],
        )
        sess = prepare(cfg, tmp_path / f"run-{on}")
        assert sess.bundle.on_device is (on == "true")
        train, valid = sess.bundle.loaders(8)
        train.set_epoch(1)
        batches[on] = [(x, y) for _, x, y in train.iterate()] + list(valid)
    for (xa, ya), (xb, yb) in zip(batches["false"], batches["true"], strict=True):
        assert xa.device.type == xb.device.type == "cuda"
        # the same augmentation parameters; grid_sample on the GPU may round the last bit differently
        torch.testing.assert_close(xa, xb, atol=1e-5, rtol=0)
        assert torch.equal(ya, yb)


def test_speedrun_shape_compiled_with_progressive_resizing_then_tta(tmp_path, folder_data):
    # the speedrun's settings at toy scale: resnet9, bf16 autocast, compile, channels_last, images on
    # the GPU, two sizes (one compile each, never one per step), then evaluate with flip TTA
    cfg = tmp_path / "speed.yaml"
    cfg.write_text(
        f"name: speed\nseed: 0\ndevice: cuda\namp: auto\ncompile: true\nchannels_last: true\n"
        f"data: {{layout: folder, path: '{folder_data}', bs: 8, on_device: auto}}\n"
        "model: {arch: resnet9, layers: [8, 16, 16, 32]}\n"
        "transforms: {preset: pad_crop, pad: 2}\ntta: {n: 1, mode: flips, beta: 0.5}\n"
        "train:\n  label_smoothing: 0.2\n  stages:\n"
        "    - {name: small, epochs: 1, lr: 1.0e-2, size: 16}\n"
        "    - {name: big, epochs: 1, lr: 1.0e-2, size: 24}\n"
    )
    run = spine.fit(load_config(cfg), tmp_path / "run").run_dir
    finite_losses(run)
    ev = runner.invoke(app, ["evaluate", str(run), "--tta", "--out", str(tmp_path / "eval")])
    assert ev.exit_code == 0, ev.output
    assert "tta" in ev.output.lower()


def test_torchrun_one_gpu_over_nccl_matches_the_plain_run(tmp_path, folder_data):
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(
        f"name: ddp\nseed: 0\ndevice: cuda\ndeterministic: true\n"
        f"data: {{layout: folder, path: '{folder_data}', bs: 8}}\nmodel: {{arch: convnet2}}\n"
        "train:\n  stages: [{name: all, epochs: 2, lr: 1.0e-2}]\n"
    )
    plain = spine.fit(load_config(cfg), tmp_path / "plain").run_dir
    env = {**os.environ, "PYTHONPATH": pythonpath(), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, *torchrun(1, "fit", str(cfg), "--out", str(tmp_path / "ddp"))],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    log = (tmp_path / "ddp" / "log.txt").read_text()
    assert "nccl" in log, log
    a, b = read_table(plain / "metrics.csv"), read_table(tmp_path / "ddp" / "metrics.csv")
    for ra, rb in zip(a, b, strict=True):
        for k in ("train_loss", "valid_loss", "accuracy"):
            assert abs(float(ra[k]) - float(rb[k])) <= 1e-4 * max(1.0, abs(float(ra[k]))), (k, ra, rb)
