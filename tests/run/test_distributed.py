"""Several processes (DDP over gloo on the CPU): the same numbers as one process with the same
global batch, one signal path, exact resume; and the pieces (shards, accumulation, sync_bn).

Tolerance: 2 processes against 1 at the same global batch give every metric within 1e-4
relative (1e-5 absolute) and every weight within 1e-5. The only difference is the order of the
floating-point sums (the gradient all-reduce averages two half-batch means); measured
differences are ~1e-7 on the weights and below the 6 digits of metrics.csv.
"""

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.runs import ROOT, assert_same_run, pythonpath, resumable_config, torchrun
from trainer import storage as checkpoint
from trainer.cli import app
from trainer.config import load_config
from trainer.data.augment import AugmentSpec
from trainer.data.loaders import ImageBatches
from trainer.data.shard import shard_train, shard_valid
from trainer.data.text import TextStreams
from trainer.models.layers import BnLayer
from trainer.run import fit as spine
from trainer.run.launch import exit_code, resume_command
from trainer.run.rundir import read_table
from trainer.run.signals import StopRequest
from trainer.run.status import read_status
from trainer.train import parallel
from trainer.train.parallel import check_batch

RTOL, ATOL, WEIGHT_ATOL = 1e-4, 1e-5, 1e-5
runner = CliRunner()


def plain_config(data: Path, extra: str = "", stages: str = "[{name: all, epochs: 2, lr: 1.0e-2}]") -> str:
    """No batch norm, dropout or augmentation: what 2 processes compute is then what 1 does."""
    return (
        f"name: eq\nseed: 0\ndata: {{layout: folder, path: '{data}', bs: 8}}\nmodel: {{arch: convnet2}}\n"
        f"train:\n{extra}  stages: {stages}\n"
    )


def run_processes(args: list[str], cwd: Path, signal_rank: int | None = None, at_step: int = 0):
    """A real multi-process run where rank 1 cannot write a file (tests/rank_instruments); with
    signal_rank, that rank's process alone gets SIGTERM at a step."""
    env = {
        **os.environ,
        "PYTHONPATH": pythonpath(ROOT / "tests" / "rank_instruments"),
        "OMP_NUM_THREADS": "1",
        "TRAINER_TEST_READONLY_RANK": "1",
    }
    if signal_rank is not None:
        env.update(TRAINER_TEST_SIGNAL_RANK=str(signal_rank), TRAINER_TEST_SIGNAL_STEP=str(at_step))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def assert_close_metrics(a: Path, b: Path) -> None:
    rows_a, rows_b = read_table(a / "metrics.csv"), read_table(b / "metrics.csv")
    assert len(rows_a) == len(rows_b)
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            if k in ("stage", "epoch") or "" in (ra[k], rb[k]):  # names, numbers, and empty cells
                assert ra[k] == rb[k], k
            elif k != "seconds":
                assert math.isclose(float(ra[k]), float(rb[k]), rel_tol=RTOL, abs_tol=ATOL), (k, ra[k], rb[k])


def assert_close_weights(a: Path, b: Path) -> None:
    wa = checkpoint.load(a / "checkpoints" / "last.pt")["model"]
    wb = checkpoint.load(b / "checkpoints" / "last.pt")["model"]
    assert wa.keys() == wb.keys()  # no "module." prefixes: checkpoints are interchangeable
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), rtol=0, atol=WEIGHT_ATOL), k


def one_then_two_processes(cfg: Path, tmp_path: Path, name: str):
    """The config trained by one process (in this one), then by 2 under torchrun: the single
    run's directory, the run directories rank 0 made, and torchrun's result."""
    single = spine.fit(load_config(cfg), tmp_path / "single").run_dir
    res = run_processes(torchrun(2, "fit", str(cfg)), tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    return single, list((tmp_path / "runs" / name).iterdir()), res


# ---- two processes for real --------------------------------------------------------------


def test_two_processes_under_torchrun_match_one_process(folder_data, tmp_path):
    # a stage with lr: auto runs lr_find under DDP too; rank 0 alone picks the run directory
    cfg = tmp_path / "eq.yaml"
    cfg.write_text(
        plain_config(folder_data, stages="[{name: find, epochs: 1, lr: auto}, {name: all, epochs: 2, lr: 1.0e-2}]")
        + "track: {tensorboard: true}\n"
    )
    single, runs, res = one_then_two_processes(cfg, tmp_path, "eq")
    assert len(runs) == 1, runs  # one run directory, made by rank 0
    two = runs[0]
    assert_close_metrics(single, two)
    assert_close_weights(single, two)
    found = [found_lr(r) for r in (single, two)]
    assert math.isclose(found[0], found[1], rel_tol=1e-6)
    assert "2 processes (gloo)" in (two / "log.txt").read_text()
    # rank 1 wrote nothing (any write there raises): the same files, every log line once, one report
    names = lambda run: sorted(p.name for p in run.iterdir() if p.name != ".lock")  # noqa: E731
    assert names(two) == names(single)
    assert sum("stage 1/2" in line for line in (two / "log.txt").read_text().splitlines()) == 1
    assert res.stdout.count("run directory:") == 1
    # rank 0 alone tracks: one event file, each epoch once
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list((two / "tensorboard").iterdir())) == 1
    events = EventAccumulator(str(two / "tensorboard"))
    events.Reload()
    assert len(events.Scalars("epoch/valid_loss")) == 3
    # the run is an ordinary run afterwards: evaluate with TTA loads its (unwrapped) weights
    ev = runner.invoke(app, ["evaluate", str(two), "--tta", "--out", str(tmp_path / "eval")])
    assert ev.exit_code == 0, ev.output


def test_a_character_model_under_two_processes_matches_one_process(text_file, tmp_path):
    """Each rank carries the hidden state of its own streams (half of the bs), so the 2-process
    run is the 1-process run: same random bptt per batch, same metrics, same weights."""
    cfg = tmp_path / "lm.yaml"
    cfg.write_text(
        f"name: lm\nseed: 0\ndata: {{layout: text, path: '{text_file}', bs: 8, bptt: 10}}\n"
        "model: {arch: gru, n_fac: 8, n_hidden: 32}\n"
        "train:\n  clip: 0.5\n  stages: [{epochs: 2, lr: 1.0e-2}]\n"
    )
    single, (two, *_), _ = one_then_two_processes(cfg, tmp_path, "lm")
    assert "2 processes (gloo)" in (two / "log.txt").read_text()
    assert_close_metrics(single, two)
    assert_close_weights(single, two)


def found_lr(run: Path) -> float:
    import json

    return json.loads((run / "lr_find-find.json").read_text())["lr"]


def test_sigterm_to_one_rank_stops_both_and_resume_gives_the_uninterrupted_run(folder_data, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(resumable_config(folder_data, every=2))  # batch norm, dropout, augmentation, 2 stages
    fit = ["-m", "trainer", "fit", str(cfg), "--devices", "2"]
    ref = run_processes([*fit, "--out", str(tmp_path / "reference")], tmp_path)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    out = tmp_path / "run"
    res = run_processes([*fit, "--out", str(out)], tmp_path, signal_rank=1, at_step=6)
    assert res.returncode == 143, res.stdout + res.stderr
    assert res.stdout.count("interrupted by SIGTERM") == 1 and "Traceback" not in res.stdout
    assert f"resume with: trainer fit {cfg} --devices 2 --resume {out}" in res.stdout
    assert read_status(out) == "interrupted"
    state = checkpoint.load(out / "checkpoints" / "last.pt")
    assert (state["stage"], state["epoch"], state["batch"]) == (1, 0, 2)  # right after step 6, on both ranks
    assert len(state["rng_ranks"]) == 2
    res = run_processes(["-m", "trainer", "fit", str(cfg), "--devices", "2", "--resume", str(out)], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert_same_run(tmp_path / "reference", out)


# ---- the pieces, in one process -------------------------------------------------------------


def image_loader(n: int = 40, bs: int = 8, **kw) -> ImageBatches:
    """Labels are the item numbers, so a batch says which items it holds."""
    return ImageBatches(
        torch.zeros(n, 1, 4, 4, dtype=torch.uint8), torch.arange(n), bs, 4, torch.zeros(1), torch.ones(1), **kw
    )


@pytest.mark.parametrize("world", [2, 4])
def test_rank_slices_are_disjoint_and_make_up_each_batch(world):
    whole = image_loader(shuffle=True, seed=3, drop_last=True)
    ranks = [shard_train(image_loader(shuffle=True, seed=3, drop_last=True), r, world) for r in range(world)]
    orders = []
    for epoch in range(3):
        whole.set_epoch(epoch)
        for r in ranks:
            r.set_epoch(epoch)
        batches = [[y.tolist() for _, _, y in r.iterate()] for r in ranks]
        for i, (_, _, y) in enumerate(whole.iterate()):
            parts = [b[i] for b in batches]
            assert all(len(p) == 8 // world for p in parts)
            joined = sum(parts, [])
            assert len(set(joined)) == len(joined)  # disjoint
            assert sorted(joined) == sorted(y.tolist())  # and together the single-process batch
        orders.append([b for b in batches[0]])
    assert orders[0] != orders[1] != orders[2]  # a new order every epoch, from the seed
    assert len(ranks[1]) == len(whole) and ranks[1].bs == 8 // world


def test_each_rank_draws_its_own_augmentation():
    """Same images on every rank: only the draws tell the slices apart (a rank salt above torch's
    32 seed bits once gave every rank the same flips)."""
    images = torch.zeros(64, 1, 4, 4, dtype=torch.uint8)
    images[..., 0] = 255  # a bright left column: a flip moves it to the right
    loader = lambda: ImageBatches(
        images, torch.arange(64), 64, 4, torch.zeros(1), torch.ones(1), augment=AugmentSpec(flip=True)
    )  # noqa: E731
    single = next(loader().iterate())[1]
    flips = [next(shard_train(loader(), r, 2).iterate())[1][:, 0, 0, -1] > 0 for r in range(2)]
    assert torch.equal(flips[0], single[:32, 0, 0, -1] > 0)  # rank 0 draws what one process does
    assert not torch.equal(flips[0], flips[1])
    assert 0 < int(flips[1].sum()) < 32  # and rank 1's are flips, not all or none


def test_validation_shards_cover_every_item_once():
    parts = [shard_valid(image_loader(n=37, bs=16), r, 3) for r in range(3)]
    items = sorted(i for p in parts for _, y in p for i in y.tolist())
    assert items == list(range(37))
    text = TextStreams(torch.arange(60).view(20, 3).repeat(1, 2), bptt=5)
    cols = [shard_valid(text, r, 2).data for r in range(2)]
    assert torch.equal(torch.cat(cols, 1), text.data)


def test_the_global_batch_must_divide(tmp_path):
    check_batch(16, 2, 2, "folder")
    with pytest.raises(ValueError, match="batch size 12 does not divide by 2 process\\(es\\) x train.accumulate 4"):
        check_batch(12, 2, 4, "folder")
    with pytest.raises(ValueError, match="train.accumulate is for image models"):
        check_batch(16, 1, 2, "text")


def test_accumulate_equals_the_whole_batch(folder_data, tmp_path):
    cfg = tmp_path / "acc.yaml"
    cfg.write_text(plain_config(folder_data).replace("bs: 8", "bs: 12"))
    whole = spine.fit(load_config(cfg), tmp_path / "whole").run_dir
    micro = spine.fit(load_config(cfg, ["train.accumulate=3"]), tmp_path / "micro").run_dir
    assert_close_metrics(whole, micro)
    assert_close_weights(whole, micro)
    steps = checkpoint.load(micro / "checkpoints" / "last.pt")["callbacks"]["recorder"]["steps"]
    assert steps["n"] == 6  # one optimizer step per batch of 12, not per micro-batch of 4


def test_sync_bn_converts_every_batchnorm_in_place():
    from trainer.config.schema import ModelConfig
    from trainer.models import create_model

    built = create_model(ModelConfig(arch="resnet18"), 3, 3, 32)
    keys, params = list(built.model.state_dict()), [id(p) for p in built.model.parameters()]
    before = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in built.model.modules())
    assert before >= 20 and parallel.convert_sync_bn(built) == before
    norms = [m for m in built.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    for holder in [*built.groups, *(m for m in built.extra.values() if isinstance(m, torch.nn.Module))]:
        assert not [m for m in holder.modules() if type(m) is torch.nn.BatchNorm2d]  # freezing sees the new ones
    assert list(built.model.state_dict()) == keys  # checkpoints keep their keys
    assert [id(p) for p in built.model.parameters()] == params


def test_sync_bn_with_torch_batchnorm_on_cpu_processes_is_refused():
    from trainer.config.schema import ModelConfig
    from trainer.models import create_model
    from trainer.train.world import World

    two = World(0, 2, 0, True)
    with pytest.raises(ValueError, match="train.sync_bn needs CUDA GPUs for this model's 22 torch BatchNorm"):
        parallel.use_sync_bn(True, create_model(ModelConfig(arch="resnet18"), 3, 3, 32), torch.device("cpu"), two)
    course = create_model(ModelConfig(arch="bnresnet", layers=[4, 8, 16]), 3, 3, 32)
    assert parallel.use_sync_bn(True, course, torch.device("cpu"), two) == 6  # the BnLayers sync over gloo
    assert all(m.sync for m in course.model.modules() if isinstance(m, BnLayer))


def test_sync_bn_two_processes_match_one_process_with_the_course_bnlayer(folder_data, tmp_path):
    """Batch norm over 2 half-batches is the whole batch's only when synced: the statistics, the
    gradients through them and the running averages all match one process. (Without sync_bn the
    same two runs differ: train loss 1.468 against 1.508.)"""
    cfg = tmp_path / "bn.yaml"
    cfg.write_text(
        plain_config(folder_data, extra="  sync_bn: true\n")
        .replace("bs: 8", "bs: 12")
        .replace("arch: convnet2", "arch: bnresnet, layers: [4, 8, 16]")
    )
    single, (two, *_), _ = one_then_two_processes(cfg, tmp_path, "eq")
    assert "sync_bn: 6 BatchNorm layer(s)" in (two / "log.txt").read_text()
    assert_close_metrics(single, two)
    assert_close_weights(single, two)  # running_mean and running_var included


def test_launcher_exit_codes_and_resume_command(monkeypatch):
    assert exit_code([143, -signal.SIGTERM]) == 143 and exit_code([130, 130]) == 130
    assert exit_code([143, 1]) == 1 and exit_code([]) == 1 and exit_code([2, 2]) == 2
    base = ["trainer", "fit", "c.yaml", "--resume", "runs/x"]
    assert resume_command(base, devices=4) == ["trainer", "fit", "c.yaml", "--devices", "4", "--resume", "runs/x"]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert resume_command(base)[:4] == ["torchrun", "--nproc-per-node=8", "-m", "trainer"]


def test_a_forwarded_signal_is_the_same_request():
    exits = []
    stop = StopRequest(exit_now=exits.append, grace=60)
    stop(signal.SIGINT)
    stop(signal.SIGINT)  # the launcher passing on the Ctrl-C this process already got
    assert stop.signum == signal.SIGINT and exits == []


def test_accumulate_under_ddp_sends_the_gradients_once_per_step(tmp_path):
    """no_sync: 4 micro-batches, one all-reduce (a one-process gloo group, in this process)."""
    import torch.distributed as dist
    import torch.nn as nn

    from trainer.train.loop import Learner
    from trainer.train.parallel import Accumulate
    from trainer.train.tasks import make_task

    x, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 2
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain, wrapped = nn.Linear(4, 2), nn.Linear(4, 2)
        wrapped.load_state_dict(plain.state_dict())
        ddp, sends = nn.parallel.DistributedDataParallel(wrapped), []

        def count(state, bucket):
            sends.append(1)
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp.register_comm_hook(None, count)
        for model, callbacks in ((plain, []), (ddp, [Accumulate(4)])):
            learn = Learner(
                model, torch.optim.SGD(model.parameters(), lr=0.5), make_task("single_label"), None, None, callbacks
            )
            learn._one_batch(x, y)
        assert len(sends) == 1
        for a, b in zip(plain.parameters(), wrapped.parameters(), strict=True):
            assert torch.allclose(a, b, rtol=0, atol=1e-6)
    finally:
        dist.destroy_process_group()
