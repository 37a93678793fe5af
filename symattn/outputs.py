"""Files a command writes for the user (documents, plots, benchmark results): paths checked before any work,
contents written atomically (a temporary file in the same folder, flushed, then renamed into place).

A rename replaces a symbolic link at the target name with a regular file; it never writes through the link,
so nothing outside the chosen folder is touched.
"""
from __future__ import annotations

import os
import shlex
import tempfile
from pathlib import Path
from typing import Callable

from .errors import SymattnError

#: Picture formats a plot may be saved in (matplotlib's Agg, PDF and SVG backends; JPEG through Pillow).
PICTURES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def output_file(path: str | os.PathLike, kinds: tuple[str, ...] | None = None, default: str | None = None) -> Path:
    """The file `path` will be written as, checked now: its folder exists and is writable, it is not a folder,
    and (with `kinds`) its suffix is one of them; a name without a suffix gets `default`."""
    text = os.fspath(path)
    if not text.strip() or text.endswith(("/", os.sep)) or os.path.isdir(text):
        raise SymattnError(f"cannot write {text!r}: give a file name, not a folder")
    out = Path(text)
    if kinds is not None:
        suffix = out.suffix.lower()
        if not suffix and default:
            out, suffix = out.with_name(out.name + default), default
        if suffix not in kinds:
            raise SymattnError(f"cannot write {text!r}: the format {suffix or '(none)'!r} is not one of "
                               f"{', '.join(kinds)}")
    folder = out.resolve().parent if not out.is_symlink() else Path(os.path.abspath(out)).parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise SymattnError(f"cannot write {text!r}: the folder {str(folder)!r} does not exist or is not writable")
    _probe(folder, text)
    return out


def _probe(folder: Path, text: str) -> None:
    """A file can be made in `folder` now (a temporary one, removed): os.access says yes to root everywhere, and
    /proc or a read-only mount refuse only when written, which would come after the heavy work."""
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".symattn-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise SymattnError(f"cannot write {text!r}: the folder {str(folder)!r} refuses new files "
                           f"({e.strerror or e})") from None


def comment_command(words: list[str]) -> str | None:
    """`words` as one shell command line for a generated file's header comment (shell-quoted), or None where a
    character would end the comment's line (a newline in a path) or not print."""
    line = shlex.join(words)
    return line if line.isprintable() else None


def output_folder(path: str | os.PathLike) -> Path:
    """A folder we may create: it, or its nearest existing ancestor, is a writable folder (an empty name is no
    folder, not the current one)."""
    if not os.fspath(path).strip():
        raise SymattnError(f"cannot write into {os.fspath(path)!r}: give a folder name")
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise SymattnError(f"cannot write into {os.fspath(path)!r}: {probe!r} is not a writable folder")
    _probe(Path(probe), os.fspath(path))
    return Path(path)


def write_atomic(path: str | os.PathLike, data: str | bytes | Callable[[str], None]) -> Path:
    """Write `data` (text, bytes, or a function that writes a file at the path it is given) to `path`
    atomically: readers see the old file or the whole new one, never a part; on failure nothing is left."""
    out = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    except OSError as e:  # a folder that refuses new files (/proc, a read-only mount, a full disk)
        raise SymattnError(f"cannot write {str(out)!r}: {e.strerror or e}") from None
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
            fd = os.open(tmp, os.O_RDONLY)
        else:
            blob = data.encode("utf-8") if isinstance(data, str) else data
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except OSError as e:
        _discard(fd, tmp)
        raise SymattnError(f"cannot write {str(out)!r}: {e.strerror or e}") from None
    except BaseException:
        _discard(fd, tmp)
        raise
    return out


def _discard(fd: int, tmp: str) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        os.unlink(tmp)
    except OSError:
        pass


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically, in the format its suffix names (no timestamps, versions or random ids
    in the file: the same figure gives the same bytes)."""
    import matplotlib
    out = Path(path)
    kind = out.suffix.lower().lstrip(".")
    kind = "jpeg" if kind == "jpg" else kind
    metadata = {"png": {"Software": None}, "pdf": {"CreationDate": None},  # keys as each matplotlib backend names
                "svg": {"Creator": None, "Date": None}}.get(kind, {})        # them (SVG refuses "Software")

    def save(tmp: str) -> None:
        with matplotlib.rc_context({"svg.hashsalt": "symattn"}):  # SVG element ids from a fixed salt, not random
            fig.savefig(tmp, format=kind, dpi=dpi, metadata=metadata or None)
    return write_atomic(out, save)
