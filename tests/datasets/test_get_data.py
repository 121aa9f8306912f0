"""trainer.datasets.get_data on tiny synthetic sources (fake IDX, JPEG and pickle tarballs, text)."""

import csv
import gzip
import io
import pickle
import struct
import subprocess
import sys
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.runs import ROOT
from trainer.datasets import get_data as G

RNG = np.random.default_rng(0)


def _idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, "JPEG")
    return buf.getvalue()


def make_sources(root: Path, flat: bool = False) -> dict:
    """Fake sources in the shared-data layout (or flat); returns the arrays written."""
    sub = (lambda d: root) if flat else (lambda d: root / d)
    for d in ("fashion-mnist", "cifar10", "text"):
        sub(d).mkdir(parents=True, exist_ok=True)
    fm = {
        "train": (RNG.integers(0, 256, (6, 28, 28)), np.array([0, 1, 9, 9, 3, 0])),
        "test": (RNG.integers(0, 256, (3, 28, 28)), np.array([2, 9, 0])),
    }
    for split, prefix in (("train", "train"), ("test", "t10k")):
        _idx(sub("fashion-mnist") / f"{prefix}-images-idx3-ubyte.gz", fm[split][0])
        _idx(sub("fashion-mnist") / f"{prefix}-labels-idx1-ubyte.gz", fm[split][1])
    # Same file name in two classes, as in the real JPEG tarball (train/<class>/0000.jpg).
    with tarfile.open(sub("cifar10") / "cifar10-jpg.tar.gz", "w:gz") as tar:
        for name in (
            "train/cat/0000.jpg",
            "train/cat/0001.jpg",
            "train/dog/0000.jpg",
            "test/cat/0000.jpg",
            "test/truck/0000.jpg",
        ):
            _tar_add(tar, name, _jpeg((200, 10, 10)))
        _tar_add(tar, "README.txt", b"not an image")
    (sub("text") / "tinyshakespeare.txt").write_text("First Citizen:\nBefore we proceed\n")
    (sub("text") / "nietzsche.txt").write_text("SUPPOSING that Truth is a woman\n")
    return fm


def make_cifar_pickle(root: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    data = {}
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            x, y = RNG.integers(0, 256, (2, 3072)).astype(np.uint8), [i % 10 for i in range(2)]
            data[name] = (x, y)
            _tar_add(tar, f"cifar-10-batches-py/{name}", pickle.dumps({b"data": x, b"labels": y}))
    return data


def trust(monkeypatch, *roots: Path) -> None:
    """Make the fakes' sha256 the only known checksums."""
    table = {}
    for root in roots:
        for f in root.rglob("*"):
            if f.is_file():
                table.setdefault(f.name, {})[G.sha256(f)] = "test"
    monkeypatch.setattr(G, "CHECKSUMS", table)


@pytest.fixture
def src(tmp_path, monkeypatch):
    root = tmp_path / "src"
    fm = make_sources(root)
    trust(monkeypatch, root)
    return root, fm


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_fashion_mnist_layouts(src, tmp_path):
    root, fm = src
    dest = tmp_path / "data"
    assert G.get_dataset("fashion_mnist", dest, root) == dest / "fashion_mnist"
    imgs, labels = fm["train"]
    for i, lab in enumerate(labels):
        img = Image.open(dest / "fashion_mnist" / "train" / G.FMNIST_CLASSES[lab] / f"{i:05d}.png")
        assert img.mode == "L" and (np.array(img) == imgs[i]).all()
    assert len(list((dest / "fashion_mnist" / "test").rglob("*.png"))) == 3
    assert sorted(p.name for p in (dest / "fashion_mnist" / "train").iterdir()) == sorted(
        {"T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"}
    )
    csv_dir = dest / "fashion_mnist_csv"
    rows = read_csv(csv_dir / "labels.csv")
    assert rows[0] == ["id", "label"]
    assert rows[1:] == [[f"{i:05d}", G.FMNIST_CLASSES[l]] for i, l in enumerate(labels)]
    test_rows = read_csv(csv_dir / "test_labels.csv")[1:]
    assert test_rows == [[f"{i:05d}", G.FMNIST_CLASSES[l]] for i, l in enumerate(fm["test"][1])]
    for i, _ in enumerate(labels):  # csv images are the same pixels as the folder ones
        assert (np.array(Image.open(csv_dir / "train" / f"{i:05d}.png")) == imgs[i]).all()
    assert (dest / "fashion_mnist" / G.MARKER).is_file() and (csv_dir / G.MARKER).is_file()
    assert not list(dest.glob(".tmp-*"))


def test_cifar_jpeg_layouts(src, tmp_path):
    root, _ = src
    dest = tmp_path / "data"
    G.get_dataset("cifar10", dest, root)
    files = sorted(str(p.relative_to(dest / "cifar10")) for p in (dest / "cifar10").rglob("*.jpg"))
    assert files == [
        "test/cat/0000.jpg",
        "test/truck/0000.jpg",
        "train/cat/0000.jpg",
        "train/cat/0001.jpg",
        "train/dog/0000.jpg",
    ]
    rows = read_csv(dest / "cifar10_csv" / "labels.csv")
    assert rows[0] == ["id", "label"] and sorted(r[1] for r in rows[1:]) == ["cat", "cat", "dog"]
    ids = [r[0] for r in rows[1:]]
    assert len(set(ids)) == 3  # unique although the JPEG names repeat across classes
    assert all((dest / "cifar10_csv" / "train" / f"{i}.jpg").is_file() for i in ids)


def test_cifar_pickle_source_writes_pngs(tmp_path, monkeypatch):
    root = tmp_path / "flat"
    data = make_cifar_pickle(root)
    trust(monkeypatch, root)
    dest = tmp_path / "data"
    G.get_dataset("cifar10", dest, root, layouts=("folder",))
    x, y = data["data_batch_3"]
    img = Image.open(dest / "cifar10" / "train" / G.CIFAR_CLASSES[y[1]] / "00005.png")  # batch 3, item 1
    assert img.mode == "RGB" and (np.array(img) == x[1].reshape(3, 32, 32).transpose(1, 2, 0)).all()
    assert len(list((dest / "cifar10" / "train").rglob("*.png"))) == 10
    assert len(list((dest / "cifar10" / "test").rglob("*.png"))) == 2
    assert not (dest / "cifar10_csv").exists()


def test_text_and_all_from_flat_source(tmp_path, monkeypatch):
    root = tmp_path / "flat"
    make_sources(root, flat=True)
    trust(monkeypatch, root)
    dest = tmp_path / "data"
    assert G.get_dataset("all", dest, root) == dest
    assert (dest / "text" / "tinyshakespeare.txt").read_text().startswith("First Citizen")
    assert (dest / "text" / "nietzsche.txt").read_bytes() == (root / "nietzsche.txt").read_bytes()
    for d in ("fashion_mnist", "fashion_mnist_csv", "cifar10", "cifar10_csv"):
        assert (dest / d / G.MARKER).is_file()


def test_second_run_is_noop(src, tmp_path, capsys):
    root, _ = src
    dest = tmp_path / "data"
    G.get_dataset("all", dest, root)
    watched = [
        dest / "fashion_mnist" / "train" / "Trouser" / "00001.png",
        dest / "cifar10_csv" / "labels.csv",
        dest / "text" / "nietzsche.txt",
        dest / "fashion_mnist" / G.MARKER,
    ]
    before = [p.stat().st_mtime_ns for p in watched]
    capsys.readouterr()
    G.get_dataset("all", dest, root)
    out = capsys.readouterr().out
    assert out.count("already prepared") == 4 and "writing" not in out
    assert [p.stat().st_mtime_ns for p in watched] == before


def test_half_written_output_is_redone(src, tmp_path):
    root, _ = src
    dest = tmp_path / "data"
    G.get_dataset("fashion_mnist", dest, root)
    (dest / "fashion_mnist" / G.MARKER).unlink()  # as if killed before the marker
    (dest / "fashion_mnist" / "train" / "Trouser" / "00001.png").unlink()
    (dest / "fashion_mnist" / "junk.txt").write_text("x")
    (dest / ".tmp-fashion_mnist-folder-999").mkdir()  # a crashed run's temp dir
    G.get_dataset("fashion_mnist", dest, root)
    assert (dest / "fashion_mnist" / "train" / "Trouser" / "00001.png").is_file()
    assert not (dest / "fashion_mnist" / "junk.txt").exists()
    assert (dest / "fashion_mnist" / G.MARKER).is_file() and not list(dest.glob(".tmp-*"))


def test_changed_source_rebuilds(src, tmp_path, monkeypatch, capsys):
    root, _ = src
    dest = tmp_path / "data"
    G.get_dataset("cifar10", dest, root)
    with tarfile.open(root / "cifar10" / "cifar10-jpg.tar.gz", "w:gz") as tar:
        _tar_add(tar, "train/ship/0000.jpg", _jpeg((0, 0, 255)))
        _tar_add(tar, "test/ship/0000.jpg", _jpeg((0, 0, 255)))
    trust(monkeypatch, root)
    G.get_dataset("cifar10", dest, root)
    assert sorted(p.name for p in (dest / "cifar10" / "train").iterdir()) == ["ship"]


def test_checksum_mismatch(src, tmp_path, monkeypatch):
    root, _ = src
    monkeypatch.setitem(G.CHECKSUMS, "nietzsche.txt", {"0" * 64: "elsewhere"})
    with pytest.raises(G.GetDataError, match="checksum mismatch"):
        G.get_dataset("nietzsche", tmp_path / "data", root)
    assert not (tmp_path / "data" / "text" / "nietzsche.txt").exists()


def test_unknown_checksum_real_table(tmp_path):
    root = tmp_path / "src"
    make_sources(root)  # fakes against the real table: rejected
    with pytest.raises(G.GetDataError, match="checksum mismatch.*expected"):
        G.get_dataset("fashion_mnist", tmp_path / "data", root)


def test_missing_source(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(G.GetDataError, match="no source files"):
        G.get_dataset("cifar10", tmp_path / "data", tmp_path / "empty")
    with pytest.raises(G.GetDataError, match="does not exist"):
        G.get_dataset("cifar10", tmp_path / "data", tmp_path / "nope")


def test_download_mode_uses_urls_and_caches(tmp_path, monkeypatch):
    root = tmp_path / "flat"
    make_sources(root, flat=True)
    trust(monkeypatch, root)
    url = (root / "nietzsche.txt").as_uri()  # urlretrieve reads file:// URLs: no network needed
    monkeypatch.setitem(G.SOURCES, "nietzsche", [(("nietzsche.txt", url, "text"),)])
    dest = tmp_path / "data"
    G.get_dataset("nietzsche", dest)
    assert (dest / "text" / "nietzsche.txt").read_bytes() == (root / "nietzsche.txt").read_bytes()
    assert (dest / ".downloads" / "nietzsche.txt").is_file()


def test_offline_is_clear_error(tmp_path, monkeypatch):
    def offline(url, filename):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(G.urllib.request, "urlretrieve", offline)
    with pytest.raises(G.GetDataError, match="could not download .*--source"):
        G.get_dataset("shakespeare", tmp_path / "data")
    assert not list((tmp_path / "data" / ".downloads").glob("*"))


def test_main_exit_codes(src, tmp_path, capsys, monkeypatch):
    root, _ = src
    assert G.main(["shakespeare", "--source", str(root), "--dest", str(tmp_path / "d")]) == 0
    monkeypatch.setitem(G.CHECKSUMS, "tinyshakespeare.txt", {"0" * 64: "x"})
    capsys.readouterr()
    assert G.main(["shakespeare", "--source", str(root), "--dest", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checksum mismatch") and "Traceback" not in err
    assert G.main(["cifar10", "--source", str(tmp_path / "missing"), "--dest", str(tmp_path / "e")]) == 2
    with pytest.raises(SystemExit) as e:  # argparse usage errors share the exit code
        G.main(["imagenet"])
    assert e.value.code == 2


def test_script_runs_without_torch(tmp_path):
    script = ROOT / "scripts" / "get_data.py"
    code = (
        "import runpy, sys; sys.argv = ['get_data.py', '--help']\n"
        f"try: runpy.run_path({str(script)!r}, run_name='__main__')\n"
        "except SystemExit: pass\n"
        "assert 'torch' not in sys.modules, 'get_data must stay torch-free'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "fashion_mnist" in r.stdout


def test_csv_layout_added_later_links_existing_folder(src, tmp_path):
    root, _ = src
    dest = tmp_path / "data"
    G.get_dataset("fashion_mnist", dest, root, layouts=("folder",))
    assert not (dest / "fashion_mnist_csv").exists()
    png = dest / "fashion_mnist" / "train" / "Trouser" / "00001.png"
    before = png.stat().st_mtime_ns
    G.get_dataset("fashion_mnist", dest, root, layouts=("folder", "csv"))
    assert png.stat().st_mtime_ns == before  # folder layout left alone
    assert (dest / "fashion_mnist_csv" / "train" / "00001.png").samefile(png)  # hardlinked, not copied
    with pytest.raises(G.GetDataError, match="layouts"):
        G.get_dataset("fashion_mnist", dest, root, layouts=("zip",))
