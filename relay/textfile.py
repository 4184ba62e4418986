"""Read an operator's text file (template, directory) as UTF-8, or say exactly why not.

How it fails: never raises on bad bytes; appends ``file:line: not UTF-8 (byte 0x.. at offset N ...)``
to the caller's error list and returns None (issue #11: a Windows-1252 file crashed ``check``).
"""

from __future__ import annotations

from pathlib import Path


def read_utf8(f: Path, errors: list[str]) -> str | None:
    """The file's text (a UTF-8 BOM is dropped), or None with a named error appended."""
    data = f.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        errors.append(f"{f}:{line}: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}; looks like "
                      f"Latin-1/Windows-1252): save the file as UTF-8")
        return None
