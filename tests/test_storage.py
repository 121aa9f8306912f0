"""Storage: a file written atomically gets the permissions a plain open() would give it (the team
reads the runs on a shared filesystem), not the 0600 of the temporary file it was written through."""

import os

import pytest

from trainer import storage


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)], ids=["022", "077", "002"])
def test_an_atomic_write_gets_the_mode_open_would_give(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        storage.atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
        storage.save({"x": 1}, tmp_path / "last.pt")  # checkpoints go the same way
        (tmp_path / "log.txt").write_text("opened plainly\n")
        assert storage.umask() == mask
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"config.yaml": mode, "last.pt": mode, "log.txt": mode}


def test_replacing_a_file_gives_the_new_one_the_same_mode(tmp_path):
    old = os.umask(0o022)
    try:
        for text in ("first\n", "second\n"):
            storage.atomic_write_text(tmp_path / "metrics.csv", text)
    finally:
        os.umask(old)
    assert (tmp_path / "metrics.csv").stat().st_mode & 0o777 == 0o644
    assert not list(tmp_path.glob(".*.tmp"))
