"""The checkpoint format: one owner for every piece of run state, so a resume is exact wherever the
run stopped (lr: auto, a new image size, precomputed activations, SGDR snapshots over stages), and a
checkpoint of the previous format still resumes exactly."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.conftest import make_folder_dataset, tiny_config
from tests.runs import Crash, CrashAt, assert_same_run, metrics_without_seconds, resumable_config
from trainer import storage
from trainer.config import load_config
from trainer.models.layers import BnLayer, batch_stats
from trainer.run import fit as spine
from trainer.run.resume import ResumeError

FIXTURE = Path(__file__).parent / "fixtures" / "v1_run"
AUTO = ("{name: all, epochs: 2, lr: 5.0e-3, unfreeze: true}", "{name: all, epochs: 2, lr: auto, unfreeze: true}")


def crash_resume_compare(tmp_path: Path, text: str, crash: CrashAt) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    spine.fit(load_config(cfg), tmp_path / "reference")
    with pytest.raises(Crash):
        spine.fit(load_config(cfg), tmp_path / "run", callbacks=[crash])
    spine.fit(load_config(cfg), resume=tmp_path / "run")
    assert_same_run(tmp_path / "reference", tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize(
    "at", [(7,), (9,), (1, "after_epoch", 99)], ids=["mid-first-epoch", "second-epoch", "just-before-it"]
)
def test_a_stage_with_lr_auto_resumes_with_the_lr_it_found(tmp_path, folder_data, at):
    """metrics.csv's peak_lr column included: the found lr rides in the checkpoint; a checkpoint
    that closed the stage before runs lr_find again, as the uninterrupted run did."""
    run = crash_resume_compare(tmp_path, resumable_config(folder_data).replace(*AUTO), CrashAt(*at))
    rows = metrics_without_seconds(run)
    assert [r["peak_lr"] != "" for r in rows] == [False, True, True]


def test_a_stage_at_a_new_size_resumes_with_its_own_best(tmp_path, folder_data):
    """Crash in the 8 px stage before its first epoch ends: best.pt must still be replaced by the
    first 8 px epoch (worse than the 16 px best), as in the uninterrupted run: the 16 px best does
    not count at another size."""
    stages = "[{epochs: 3, lr: 1.0e-2, size: 16}, {epochs: 2, lr: 1.0e-5, size: 8}]"  # worse at 8 px
    text = tiny_config(folder_data, stages=stages) + "  checkpoint_every: 1\n"
    run = crash_resume_compare(tmp_path, text, CrashAt(14))
    assert storage.load(run / "checkpoints" / "best.pt")["stage"] == 1


def test_a_precomputed_stage_resumes_mid_stage(tmp_path, folder_data):
    stages = (
        "\n    - {name: head, epochs: 2, lr: 1.0e-2, freeze: body, precompute: true}"
        "\n    - {name: all, epochs: 1, lr: 1.0e-2, unfreeze: true}"
    )
    own_cache = f", cache_dir: '{tmp_path / 'cache'}'"  # activations of its own: other tests expect to compute theirs
    text = tiny_config(folder_data, stages=stages, data_extra=own_cache) + "  checkpoint_every: 1\n"
    crash_resume_compare(tmp_path, text, CrashAt(6))


def test_snapshot_numbers_continue_over_stages_after_a_resume(tmp_path, folder_data):
    stages = (
        "\n    - {name: a, schedule: sgdr, n_cycles: 2, cycle_len: 1, lr: 2.0e-2, save_cycles: true}"
        "\n    - {name: b, schedule: sgdr, n_cycles: 2, cycle_len: 1, lr: 1.0e-2, save_cycles: true}"
    )
    run = crash_resume_compare(
        tmp_path, tiny_config(folder_data, stages=stages) + "  checkpoint_every: 1\n", CrashAt(10)
    )  # in stage b's first cycle
    for k in (1, 2, 3, 4):
        want = storage.load(tmp_path / "reference" / "checkpoints" / f"cycle-{k}.pt")
        got = storage.load(run / "checkpoints" / f"cycle-{k}.pt")
        assert (got["stage"], got["epoch"], got["cycle"]) == (want["stage"], want["epoch"], want["cycle"])


def _v1_run(tmp_path: Path) -> tuple[Path, Path]:
    """The fixture: a run of the pre-renovation code (checkpoint version 1), crashed in its lr: auto
    stage; its data made again here, its config pointed at it."""
    data = make_folder_dataset(tmp_path / "shapes")
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    saved = run / "config.yaml"
    saved.write_text(saved.read_text().replace("/tmp/v1gen/work/shapes", str(data)))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(resumable_config(data).replace(*AUTO))
    return cfg, run


def norm_of_the_time(self, x):
    """BnLayer.forward as the fixture's code wrote it out (the fused F.batch_norm of today rounds
    differently, within 1e-7: tests/models/test_bnlayer_fused.py), so the bitwise check below is
    about the checkpoint's upgrade and nothing else."""
    x = F.relu(self.conv(x))
    if self.training:
        mean, var = batch_stats(x, False)
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach().float(), self.momentum)
            self.running_var.lerp_(var.detach().float(), self.momentum)
    else:
        mean, var = self.running_mean, self.running_var
    return (x - mean) / (var + 1e-5).sqrt() * self.m + self.a


def test_a_version_1_checkpoint_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch):
    """Bitwise on the kind of CPU the fixture was made on; elsewhere (other kernels round otherwise)
    within 1e-5 of the old code's uninterrupted run on an AVX2 CPU: the resumed tensors were at most
    6e-7 from it, and a checkpoint upgraded with its momentum lost up to 0.47 (4e-2 in a weight)."""
    monkeypatch.setattr(BnLayer, "forward", norm_of_the_time)
    cfg, run = _v1_run(tmp_path)
    assert storage.load(run / "checkpoints" / "last.pt")["version"] == 1
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the fixture's: a sum over two threads rounds unlike one over one
    try:
        spine.fit(load_config(cfg), resume=run)
    finally:
        torch.set_num_threads(threads)
    reference = json.loads((FIXTURE / "reference.json").read_text())
    assert metrics_without_seconds(run) == reference["metrics"]  # peak_lr included
    model = storage.load(run / "checkpoints" / "last.pt")["model"]
    uninterrupted = load_file(FIXTURE / "uninterrupted_avx2.safetensors")
    assert model.keys() == uninterrupted.keys()
    for k, v in model.items():
        torch.testing.assert_close(v, uninterrupted[k], rtol=0, atol=1e-5, msg=k)
    if torch.backends.cpu.get_cpu_capability() == reference["cpu_capability"]:
        digests = {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() for k, v in model.items()}
        assert digests == reference["weights_sha256"]  # bitwise


def test_a_checkpoint_of_an_unknown_version_is_refused_by_name(tmp_path):
    cfg, run = _v1_run(tmp_path)
    state = storage.load(run / "checkpoints" / "last.pt")
    storage.save({**state, "version": 7}, run / "checkpoints" / "last.pt")
    with pytest.raises(ResumeError, match="not a resumable checkpoint of version 2 \\(it is version 7\\)"):
        spine.fit(load_config(cfg), resume=run)
