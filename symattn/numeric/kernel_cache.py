"""The caches of generated kernel modules: cache_dir() (per generator fingerprint), the dot family's variant
modules (load_variant: variant_<tag>.py rendered per (score mod, mask)) and the unrolled kernels of a spec
(load_unrolled). A cached file is imported only when its content hash holds; a damaged one is regenerated with one
line saying so. Loading a cached module needs no SymPy.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
from pathlib import Path

from ..errors import SymattnError
from ..filestamp import damage
from ..progress import silent


def variant_tag(mod, mask) -> str:
    """File-name part of a (mod, mask) variant of the dot kernels; run-time mask data is not part of it, so one
    module serves any ids or lengths."""
    import hashlib
    tag = f"dot_{mod.tag if mod else 'nomod'}_{mask.kernel_tag if mask else 'nomask'}"
    if len(tag) > 80 or not tag.isidentifier():
        tag = "dot_" + hashlib.sha256(tag.encode()).hexdigest()[:16]
    return tag


def element_name(score: str, mod, mask) -> str:
    """Module name of the element kernels of (score, mod, mask): readable parts and a short hash of the exact
    variant (mask texts of users' mask_mods carry the hash of their traced condition)."""
    import hashlib
    arrays = tuple(name for name, _ in getattr(mask, "arrays", ()) or ())
    text = "" if mask is None else (getattr(mask, "kernel_text", "") or mask.text)  # without run-time data
    key = "|".join((score, "" if mod is None else mod.text, text, *arrays))
    tag = "_".join(x for x in (score, "" if mod is None else mod.tag, text) if x)
    tag = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in tag)[:40]
    return f"element_{tag}_{hashlib.sha256(key.encode()).hexdigest()[:10]}"


_VARIANTS: dict[tuple[Path, str], object] = {}


def load_variant(mod, mask, folder=None, progress=None):
    """The kernel module of the (mod, mask) variant: imported from `folder` (default: cache_dir()) when its
    content hash holds, else rendered from the derivation (needs SymPy), written through codegen's writer and
    imported (a damaged file is regenerated with one line saying so). Loaded once per process."""
    tag = variant_tag(mod, mask)
    folder = cache_dir() if folder is None else Path(folder)
    key = (folder, tag)  # not the joined path: building it took ~8 µs of every variant call
    if key in _VARIANTS:
        return _VARIANTS[key]
    path = folder / f"variant_{tag}.py"
    module = load_generated(path, f"symattn_generated_variant_{tag}", lambda: _write_variant(mod, mask, path),
                            ("forward_tiles", "backward_tiles", "attention_forward", "attention_backward"), progress)
    _VARIANTS[key] = module
    return module


def _write_variant(mod, mask, path: Path) -> None:
    from ..codegen import loop, write_files  # codegen needs SymPy: loaded only when kernels must be written
    write_files({path.name: loop.render_variant(mod, mask, path.stem)}, path.parent, force=True)


#: What generates cached kernels (relative to the package): their sources and templates make the fingerprint.
GENERATOR = ("symbolic", "codegen", "filestamp.py", "numeric/kernels.py", "numeric/kernel_cache.py",
             "numeric/variants.py")


def generator_files() -> list[Path]:
    """The files of GENERATOR (Python sources and Jinja2 templates), in a fixed order."""
    package = Path(__file__).parent.parent
    roots = [package / part for part in GENERATOR]
    files = [f for root in roots for f in (root.rglob("*") if root.is_dir() else [root]) if f.suffix in (".py", ".j2")]
    return sorted(files, key=lambda f: f.relative_to(package).as_posix())


@functools.cache
def _fingerprint() -> str:
    """Hash of the generator's source and templates (generator_files()): generated kernels are cached per generator
    version, and editing the CLI, the renderers or the checks keeps the cache (read once a process: the source
    does not change under a running program)."""
    import hashlib
    package = Path(__file__).parent.parent
    digest = hashlib.sha256()
    for path in generator_files():
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    """Where verify/bench keep generated unrolled kernels: $SYMATTN_CACHE or ~/.cache/symattn/kernels/<fingerprint>
    (a changed generator never reuses kernels written by an older one). Read from the environment on every call,
    built once per value: every variant call asks (building the path cost ~50 µs of a 0.6 ms call)."""
    return _cache_dir(os.environ.get("SYMATTN_CACHE"), os.environ.get("HOME"))


@functools.lru_cache(maxsize=8)
def _cache_dir(override: str | None, home: str | None) -> Path:
    root = Path(override) if override else Path.home() / ".cache" / "symattn"
    return root / "kernels" / _fingerprint()


def load_unrolled(spec, folder=None, progress=None):
    """The module of `spec`'s unrolled kernels, generated into `folder` (default: cache_dir()) if needed.

    A cached file is imported only when its content hash holds; a missing one is generated, an empty, truncated
    or edited one regenerated with one line saying so (through `progress`, else on stderr). A file that fails to
    import is regenerated once, then reported (SymattnError naming its path). Returns None where unrolled kernels
    do not pay (see codegen.unrolled.UNROLL_LIMIT)."""
    folder = cache_dir() if folder is None else Path(folder)
    path = folder / f"{spec.name}.py"
    name = f"symattn_generated_{spec.name}"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    return load_generated(path, name, lambda: _regenerate(spec, folder, progress),
                          (f"{spec.name}_forward", f"{spec.name}_backward"), progress)


def load_generated(path: Path, name: str, write, kernels: tuple, progress=None):
    """The generated module at `path`, imported as `name` when its content hash holds and it holds `kernels`.
    write() (re)writes the file: when it is missing, or damaged (one line saying so), or fails to load (once,
    then SymattnError naming it); write() returning False means nothing pays to be written: None."""
    fault = _fault(path)
    if fault is not None:
        if fault != "missing":
            _notice(progress, f"{path} was {fault}; regenerated")
        if write() is False:
            return None
    try:
        return _heal_numba_cache(_import(name, path, kernels), path, progress)
    except Exception as e:  # SyntaxError, a missing kernel, ...: whatever stops the file from loading
        _notice(progress, f"{path} failed to load ({_why(e)}); regenerated")
    if write() is False:
        return None
    try:
        return _heal_numba_cache(_import(name, path, kernels), path, progress)
    except Exception as e:
        raise SymattnError(f"generated kernels {path} fail to load even after regenerating them: {_why(e)}") from e


def _heal_numba_cache(module, path: Path, progress):
    """`module`, its kernels' files in Numba's on-disk cache checked first: an index (.nbi) or data file (.nbc)
    that does not unpickle is removed (one line saying so), so its kernel compiles again. Numba would raise the raw
    pickle error at the kernel's first call, and at every call after."""
    folders = {getattr(getattr(x, "_cache", None), "_cache_path", None) for x in vars(module).values()} - {None}
    bad = [f for folder in folders for f in sorted(Path(folder).glob(f"{path.stem}.*.nb[ic]")) if not _unpickles(f)]
    for f in bad:
        with contextlib.suppress(OSError):  # not ours to remove (permissions): Numba's own error will name it
            f.unlink(missing_ok=True)
    if bad:
        _notice(progress, f"Numba's cache of {path} was damaged ({len(bad)} file{'s' * (len(bad) > 1)}, e.g. "
                          f"{bad[0].name}); removed, its kernels compile again")
    return module


def _unpickles(f: Path) -> bool:
    """Whether Numba can read its cache file: an index is a pickled version, then pickled data; data is one pickle."""
    import pickle
    try:
        with open(f, "rb") as stream:
            if f.suffix == ".nbi":
                pickle.load(stream)
            pickle.loads(stream.read())
        return True
    except FileNotFoundError:
        return True  # another process replaced it meanwhile: Numba copes with a missing file
    except Exception:  # noqa: BLE001 - whatever stops the unpickling: truncated, junk, another format
        return False


def _fault(path: Path) -> str | None:
    """'missing', a damage kind ('empty', 'truncated', 'edited') or None for a file as symattn wrote it."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):  # NotADirectoryError: $SYMATTN_CACHE names a file
        return "missing"
    except OSError:
        return "unreadable"
    fault = damage(data)
    return None if fault is None else fault.kind


def _regenerate(spec, folder: Path, progress) -> bool:
    """Write `spec`'s kernels into `folder` over whatever is there; False where unrolled kernels do not pay."""
    from ..codegen import generate  # codegen needs SymPy: loaded only when kernels must be written
    from ..codegen.unrolled import pays_for
    if not pays_for(spec):
        return False
    generate(spec, folder, progress=progress or silent, force=True)
    return True


def _import(name: str, path: Path, kernels: tuple):
    """Import the generated module at `path` from the very bytes whose content hash was checked; it must hold
    `kernels` (names) and name itself: CACHE_KEY, written by the generator, is the file's stem."""
    data = path.read_bytes()
    fault = damage(data)
    if fault is not None:
        raise SymattnError(fault.reason)
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # Numba's cache pickles the module name: it must resolve on reload
    try:
        exec(module_spec.loader.source_to_code(data, str(path)), module.__dict__)  # what exec_module does
        for kernel in kernels:
            getattr(module, kernel)
        key = getattr(module, "CACHE_KEY", None)
        if key != path.stem:  # a valid file of other kernels (copied or linked here): its content hash holds
            raise SymattnError(f"it holds the kernels of {key!r}, not {path.stem!r}")
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _why(error: BaseException) -> str:
    """One line: the error's type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return type(error).__name__ + (f": {lines[0]}" if lines else "")


def _notice(progress, message: str) -> None:
    """One line through `progress`, or on stderr."""
    if progress is not None:
        progress(message)
    else:
        print(f"symattn: {message}", file=sys.stderr, flush=True)
