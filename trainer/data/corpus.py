"""Checks for a text corpus, shared by the text layout: a clear error instead of a crash or a
model trained on nothing."""

from __future__ import annotations

from pathlib import Path

from trainer.data.items import DataError


def read_corpus(path: str | Path, key: str = "data.path", min_chars: int = 2) -> str:
    """The file's text (UTF-8, a leading byte-order mark dropped), or a DataError saying what is
    wrong: missing, not a file, not UTF-8, binary, empty, or shorter than min_chars."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: {key} should name a UTF-8 text file ({'a folder' if p.is_dir() else 'not found'})")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); convert it, "
                        f"e.g. iconv -f latin1 -t utf-8 {p.name} > {p.stem}.utf8{p.suffix}") from None
    if "\x00" in text:
        raise DataError(f"{p}: looks binary (NUL bytes at offset {text.index(chr(0))}), not a text corpus")
    if not text.strip():
        raise DataError(f"{p}: the text corpus is empty")
    if len(text) < min_chars:
        raise DataError(f"{p}: the text corpus has {len(text)} characters; it needs at least {min_chars}")
    return text
