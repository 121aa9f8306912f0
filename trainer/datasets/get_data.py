"""Fetch, verify and lay out the datasets the example configs train on.

Image sets get two layouts, matching the two ways fast.ai reads images:
  folder: <name>/{train,test}/<class>/<id>.<ext>
  csv:    <name>_csv/{train,test}/<id>.<ext> plus <name>_csv/labels.csv (train)
          and <name>_csv/test_labels.csv, header `id,label`, id without suffix.
Text sets are copied verbatim to text/<file>.txt.

Deliberately torch-free (numpy, pillow, stdlib) so it runs before the heavy install; the
reading and writing of each format is in trainer/datasets/formats.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# the class names are re-exported: callers and tests read them here
from trainer.datasets.formats import (  # noqa: F401
    CIFAR_CLASSES,
    FMNIST_CLASSES,
    FMNIST_FILES,
    GetDataError,
    build_cifar10,
    build_csv,
    build_fashion_mnist,
    log,
)

FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# Accepted sha256 per source file (sha256sum format + origin). Several per name because the same
# data ships differently packed: Debian re-gzipped the Fashion-MNIST files (/work/shared/data has
# those). CIFAR-10's pickle and JPEG tarballs have different names, so each has its own line.
KNOWN_SHA256 = """
08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc  train-images-idx3-ubyte.gz  zalando
b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc  train-labels-idx1-ubyte.gz  zalando
78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229  t10k-images-idx3-ubyte.gz  zalando
42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf  t10k-labels-idx1-ubyte.gz  zalando
b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7  train-images-idx3-ubyte.gz  debian
0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056  train-labels-idx1-ubyte.gz  debian
cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa  t10k-images-idx3-ubyte.gz  debian
8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05  t10k-labels-idx1-ubyte.gz  debian
6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce  cifar-10-python.tar.gz  toronto-pickle
d7edcf8b894b982d2e47f3bdb765659352fd7bc1e387bde7989054250cf4e6c5  cifar10-jpg.tar.gz  jpeg-reencode
86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed  tinyshakespeare.txt  char-rnn
442ca0d2f6e62d041e591063704f897f92de93a6f96324009f510a4858a6049c  nietzsche.txt  fast.ai
"""
CHECKSUMS: dict[str, dict[str, str]] = {}  # file name -> {sha256: origin}; tests patch this
for _digest, _name, _origin in (line.split() for line in KNOWN_SHA256.strip().splitlines()):
    CHECKSUMS.setdefault(_name, {})[_digest] = _origin

# dataset -> list of alternatives; each alternative is a tuple of (file name, url, subdir of
# the shared-data layout). The first alternative is what a download fetches.
SOURCES = {
    "fashion_mnist": [tuple((f, FMNIST_URL + f, "fashion-mnist") for f in FMNIST_FILES)],
    "cifar10": [
        (("cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar10"),),
        (("cifar10-jpg.tar.gz", None, "cifar10"),),
    ],
    "shakespeare": [
        (
            (
                "tinyshakespeare.txt",
                "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                "text",
            ),
        )
    ],
    "nietzsche": [(("nietzsche.txt", "https://s3.amazonaws.com/text-datasets/nietzsche.txt", "text"),)],
}
DATASETS = tuple(SOURCES)
TEXT_DATASETS = ("shakespeare", "nietzsche")
LAYOUTS = ("folder", "csv")
MARKER = ".prepared.json"
FORMAT_VERSION = 1  # bump when the output layout changes so old outputs are rebuilt


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- locating and verifying sources


def _find_local(name: str, subdir: str, source: Path) -> Path | None:
    # Accept both /work/shared/data's layout (<subdir>/<name>) and a flat folder of files.
    for cand in (source / subdir / name, source / name):
        if cand.is_file():
            return cand
    if name == "tinyshakespeare.txt":  # char-rnn calls it input.txt
        return _find_local("input.txt", subdir, source)
    return None


def _download(name: str, url: str | None, cache: Path) -> Path:
    target = cache / name
    if target.is_file():
        return target
    if url is None:
        raise GetDataError(f"{name} has no download URL; pass --source with a folder holding it")
    cache.mkdir(parents=True, exist_ok=True)
    part = target.with_suffix(target.suffix + ".part")
    log(f"  downloading {url}")
    try:
        urllib.request.urlretrieve(url, part)
    except (urllib.error.URLError, OSError) as e:
        part.unlink(missing_ok=True)
        raise GetDataError(
            f"could not download {url} ({getattr(e, 'reason', e)}); offline? pass --source DIR pointing at local copies (make data DATA_SOURCE=DIR)"
        ) from None
    os.replace(part, target)
    return target


def locate(dataset: str, source: Path | None, cache: Path) -> list[Path]:
    """Paths of the dataset's source files: the first complete alternative under `source`, else downloaded."""
    alternatives = SOURCES[dataset]
    if source is None:
        return [_download(name, url, cache) for name, url, _ in alternatives[0]]
    if not source.is_dir():
        raise GetDataError(f"source folder {source} does not exist")
    for alt in alternatives:
        found = [_find_local(name, sub, source) for name, _, sub in alt]
        if all(found):
            return found
    wanted = " or ".join("+".join(n for n, _, _ in alt) for alt in alternatives)
    raise GetDataError(f"{dataset}: no source files under {source} (need all of: {wanted})")


def verify_sources(paths: list[Path], names: list[str]) -> dict[str, str]:
    """sha256 of each source, checked against CHECKSUMS under its canonical name."""
    digests = {}
    for path, name in zip(paths, names, strict=True):
        digest, known = sha256(path), CHECKSUMS.get(name, {})
        if digest not in known:
            expected = ", ".join(f"{d[:12]}… ({k})" for d, k in known.items()) or "none known"
            raise GetDataError(
                f"checksum mismatch for {path}: sha256 {digest[:12]}…, expected {expected}; "
                "the file is corrupt or an unknown version "
                "(a bad download in .downloads/ can be deleted)"
            )
        digests[name] = digest
    return digests


# ---------------------------------------------------------------- layouts, markers, atomic output


def is_built(out: Path, dataset: str, layout: str, digests: dict[str, str] | None) -> bool:
    """True if `out` holds a finished build of this layout (from these sources, when they are known)."""
    try:
        m = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    same = m.get("dataset") == dataset and m.get("layout") == layout and m.get("version") == FORMAT_VERSION
    return same and (digests is None or m.get("sources") == digests)


def _commit(tmp: Path, out: Path, marker: dict) -> None:
    # The marker goes in before the rename, so a directory with a marker is always complete.
    (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _digests(paths: list[Path], names: list[str], check: bool) -> dict[str, str]:
    # --no-verify still records the digests, so the marker notices a changed source.
    return verify_sources(paths, names) if check else {n: sha256(p) for p, n in zip(paths, names, strict=True)}


def get_images(dataset: str, dest: Path, source: Path | None, layouts, check: bool) -> Path:
    outs, cache = {"folder": dest / dataset, "csv": dest / f"{dataset}_csv"}, dest / ".downloads"
    paths = locate(dataset, source, cache) if source is not None else None
    digests = _digests(paths, [p.name for p in paths], check) if paths else None
    todo = [l for l in layouts if not is_built(outs[l], dataset, l, digests)]
    if not todo:
        log(f"{dataset}: already prepared in {', '.join(str(outs[l]) for l in layouts)} (nothing to do)")
        return outs[layouts[0]]
    if paths is None:  # download mode: fetch only now that there is work to do
        paths = locate(dataset, None, cache)
        digests = _digests(paths, [p.name for p in paths], check)
    t0 = time.perf_counter()
    for stale in dest.glob(f".tmp-{dataset}*"):  # leftovers of an interrupted run
        shutil.rmtree(stale)
    tmp = {l: dest / f".tmp-{dataset}-{l}-{os.getpid()}" for l in LAYOUTS}
    marker = {"dataset": dataset, "version": FORMAT_VERSION, "sources": digests}
    try:
        folder = outs["folder"] if is_built(outs["folder"], dataset, "folder", digests) else None
        if folder is None:
            log(f"{dataset}: building folder layout from {', '.join(p.name for p in paths)}")
            tmp["folder"].mkdir(parents=True)
            (build_fashion_mnist if dataset == "fashion_mnist" else build_cifar10)(paths, tmp["folder"])
            folder = tmp["folder"]
        if "csv" in todo:
            log(f"{dataset}: building csv layout")
            tmp["csv"].mkdir(parents=True)
            build_csv(folder, tmp["csv"])
            _commit(tmp["csv"], outs["csv"], {**marker, "layout": "csv"})
        if "folder" in todo:
            _commit(tmp["folder"], outs["folder"], {**marker, "layout": "folder"})
    finally:  # on failure, and for a folder layout built only to feed the csv one
        for t in tmp.values():
            shutil.rmtree(t, ignore_errors=True)
    log(f"{dataset}: done in {time.perf_counter() - t0:.1f}s -> {', '.join(str(outs[l]) for l in todo)}")
    return outs[layouts[0]]


def get_text(dataset: str, dest: Path, source: Path | None, check: bool) -> Path:
    name = SOURCES[dataset][0][0][0]
    out = dest / "text" / name
    known = set(CHECKSUMS.get(name, {}))
    if source is None and out.is_file() and sha256(out) in known:
        log(f"{dataset}: already prepared in {out} (nothing to do)")
        return out
    src = locate(dataset, source, dest / ".downloads")[0]
    digest = _digests([src], [name], check)[name]
    if out.is_file() and sha256(out) == digest:
        log(f"{dataset}: already prepared in {out} (nothing to do)")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{name}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, out)
    log(f"{dataset}: copied {src} -> {out}")
    return out


def get_dataset(dataset: str, dest: Path, source: Path | None = None, layouts=LAYOUTS, verify: bool = True) -> Path:
    """Prepare `dataset` (or "all") under `dest`; returns the output path. Idempotent.

    source: folder with local copies (shared-data layout or flat); None downloads the official files.
    layouts: image layouts to build ("folder", "csv"); ignored for text sets.
    verify: check source sha256 against CHECKSUMS (False only for unknown-but-trusted files).
    """
    dest, source = Path(dest), (Path(source) if source is not None else None)
    layouts = tuple(layouts)
    if not layouts or any(l not in LAYOUTS for l in layouts):
        raise GetDataError(f"bad layouts {layouts}; choose from {', '.join(LAYOUTS)}")
    if dataset == "all":
        for name in DATASETS:
            get_dataset(name, dest, source, layouts, verify)
        return dest
    if dataset not in SOURCES:
        raise GetDataError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}, all")
    dest.mkdir(parents=True, exist_ok=True)
    if dataset in TEXT_DATASETS:
        return get_text(dataset, dest, source, verify)
    return get_images(dataset, dest, source, layouts, verify)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="get_data.py", description="Download/verify datasets and lay them out.")
    p.add_argument("dataset", choices=(*DATASETS, "all"))
    p.add_argument("--dest", type=Path, default=Path("data"), help="output root (default: data)")
    p.add_argument("--source", type=Path, help="folder with local source files instead of downloading")
    p.add_argument(
        "--layout", action="append", choices=LAYOUTS, help="image layout to build; repeatable (default: both)"
    )
    p.add_argument("--no-verify", action="store_true", help="skip sha256 checks (unknown but trusted files)")
    args = p.parse_args(argv)
    if args.no_verify:
        print("warning: checksums not verified", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        get_dataset(args.dataset, args.dest, args.source, tuple(args.layout or LAYOUTS), not args.no_verify)
    except GetDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(f"finished in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
