"""The one writer of generated files: atomic, never through a symbolic link, never over a hand edit.

Every file is written to a temporary file in its folder, flushed to disk and renamed over its final name
(outputs.write_atomic), so the final name only ever holds a complete file; a rename replaces a link itself,
never its target. Existing files are read without following links, as bytes.
"""
from __future__ import annotations

import difflib
import os
import stat
from pathlib import Path

from ..errors import SymattnError
from ..filestamp import damage
from ..outputs import write_atomic


def _name(name: str) -> str:
    """A plain file name: generated names come from spec.name and never hold a path."""
    if not name or name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name):
        raise ValueError(f"generated file name {name!r} is not a plain file name")
    return name


def _current(path: Path) -> tuple[bool, bytes | None]:
    """(is a symbolic link, bytes of the regular file or None) at `path`, never following a link."""
    try:
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            return True, None
        if not stat.S_ISREG(mode):
            raise SymattnError(f"cannot write {path}: something other than a file is there")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            return False, f.read()
    except FileNotFoundError:
        return False, None
    except OSError as e:
        raise SymattnError(f"cannot read {path}: {e.strerror}") from None


def _refusal(link: bool, old: bytes | None, new: bytes) -> str | None:
    """Why writing `new` over `_current`'s (link, old) needs force: a link, or a file symattn did not write as is."""
    if link:
        return "it is a symbolic link (symattn never writes through one)"
    if old is None or old == new or new.startswith(old):  # missing, the same, or cut short while written
        return None
    fault = damage(old)
    return None if fault is None or fault.kind == "empty" else fault.reason


def refused(files: dict[Path, str]) -> list[Path]:
    """The paths among `files` (path -> text) that `write_files` would refuse to overwrite without force."""
    return [path for path, text in files.items() if _refusal(*_current(path), text.encode())]


def write_files(files: dict[str, str], out_dir: str | Path, *, force: bool = False) -> list[Path]:
    """The one writer of generated code: `files` (name -> stamped text) into `out_dir`; returns the paths.

    Unchanged files are left untouched (Numba's cache stays valid). A name that is a symbolic link, or holds a
    file edited by hand or not written by symattn, is refused with SymattnError unless `force`; then the link or
    file itself is replaced. Nothing outside `out_dir` is ever written."""
    return write_folders({Path(out_dir): files}, force=force)


def write_folders(folders: dict[Path, dict[str, str]], *, force: bool = False) -> list[Path]:
    """`write_files` for several folders at once: every file of every folder is checked before the first is
    written, so a refusal leaves them all as they were."""
    for out in folders:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SymattnError(f"cannot write generated code into {str(out)!r}: {e.strerror}") from None
    changed = [change for out, files in folders.items() for change in _changes(files, out, force)]
    for path, data in changed:
        try:
            write_atomic(path, data)  # a temporary file beside it, fsync, rename: never a partial file
        except OSError as e:  # creating the temporary file
            raise SymattnError(f"cannot write {path}: {e.strerror or e}") from None
    return [out / _name(name) for out, files in folders.items() for name in sorted(files)]


def _changes(files: dict[str, str], out: Path, force: bool) -> list[tuple[Path, bytes]]:
    """(path, bytes) of each file of `files` that differs from what `out` holds; a refusal raises SymattnError."""
    changed = []
    for name, text in sorted(files.items()):
        path, data = out / _name(name), text.encode()
        if damage(data):
            raise ValueError(f"rendered {name} carries no valid content hash (render it with filestamp.stamp)")
        link, old = _current(path)
        if link or old != data:
            reason = None if force else _refusal(link, old, data)
            if reason:
                raise SymattnError(f"refusing to overwrite {path}: {reason}; --force replaces it")
            changed.append((path, data))
    return changed


def diff_files(files: dict[Path, str]) -> list[str]:
    """Unified diffs of each file on disk against the text it should have; empty when all match."""
    diffs = []
    for path, text in files.items():
        have = path.read_bytes().decode("utf-8", "replace") if path.exists() else ""
        if have != text:
            diffs.append("".join(difflib.unified_diff(have.splitlines(True), text.splitlines(True),
                                                      f"{path} (committed)", f"{path} (regenerated)")))
    return diffs
