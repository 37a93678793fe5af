"""Generated files heal themselves: atomic writes, content hashes checked on load, no writes through links.

Each test simulates one way a generated file goes wrong: cut short (at 5,000 bytes, on a line boundary), empty,
edited, not UTF-8, a symbolic link out of the folder, a full disk, a generator that writes bad code, two
processes at once, and `--check` outside a source checkout.
"""
import contextlib
import errno
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import symattn.codegen as codegen
from symattn import AttentionSpec, SymattnError, reference
from symattn.app.cli import main
from symattn.codegen import generate, render, write_files
from symattn.codegen.templates import HEADER
from symattn.filestamp import PLACEHOLDER, damage, stamp
from symattn.numeric.kernels import cache_dir, load_unrolled
from symattn.progress import silent

SPEC = AttentionSpec(2, 3, 2)
NAME = f"{SPEC.name}.py"
GENERATE = ["generate", "--n-q", "2", "--n-k", "3", "--d-k", "2", "-q"]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty kernel cache ($SYMATTN_CACHE) and no kernels of SPEC imported yet."""
    monkeypatch.setenv("SYMATTN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delitem(sys.modules, f"symattn_generated_{SPEC.name}", raising=False)
    return cache_dir()


def later_run(spec=SPEC):
    """load_unrolled as a new process would see it: nothing imported yet."""
    sys.modules.pop(f"symattn_generated_{spec.name}", None)
    return load_unrolled(spec)


def assert_matches_reference(module, spec=SPEC):
    """The kernels give the NumPy reference's numbers (outputs start as NaN: unwritten entries show)."""
    rng = np.random.default_rng(7)
    Q, K, V, dO = (rng.normal(size=s) for s in ((spec.n_q, spec.d_k), (spec.n_k, spec.d_k), (spec.n_k, spec.d_v),
                                                 (spec.n_q, spec.d_v)))
    O = np.full((spec.n_q, spec.d_v), np.nan)
    getattr(module, f"{spec.name}_forward")(Q, K, V, O)
    np.testing.assert_allclose(O, reference.attention(Q, K, V), rtol=1e-12, atol=1e-12)
    grads = [np.full_like(x, np.nan) for x in (Q, K, V)]
    getattr(module, f"{spec.name}_backward")(Q, K, V, dO, *grads)
    for got, want in zip(grads, reference.attention_backward(Q, K, V, dO)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def restamped(text: str) -> str:
    """`text` (edited) with a content hash that matches again: what an older generator would have written."""
    return stamp(re.sub(r"symattn-sha256: [0-9a-f]{64} \(\d+ bytes\)", PLACEHOLDER, text, count=1))


DAMAGE = {  # name: (what is done to a generated file, the word the notice uses)
    "cut at 5,000 bytes": (lambda data: data[:5000], "truncated"),
    "cut on a line boundary": (lambda data: data[:data.index(b"    dV[0, 0] =")], "truncated"),
    "empty": (lambda data: b"", "empty"),
    "edited": (lambda data: data.replace(b"O[0, 0] = ", b"O[0, 0] = 2.0 * ", 1), "edited"),
    "not UTF-8": (lambda data: data.replace(b"# Inputs", b"# \xff\xfe Inputs", 1), "edited"),
}


def test_stamp_and_damage():
    text = stamp(HEADER.substitute(source="a test", command="none") + "x = 1\ny = 2\n")
    data = text.encode()
    assert damage(data) is None and PLACEHOLDER not in text
    assert damage(data[:-4]).kind == "truncated"
    assert damage(data.replace(b"x = 1", b"x = 3")).kind == "edited"
    assert damage(data.replace(b"x = 1", b"x = 1\xff")).kind == "edited"
    assert damage(b"").kind == "empty"
    assert damage(b"def mine(): pass\n") == ("edited", "it has no symattn header (not written by symattn)")
    assert damage(data[:30]).kind == "truncated"  # cut inside the header, before the hash line


def test_every_committed_generated_file_carries_a_valid_hash():
    paths = [*REPO.glob("generated/*.py"), *REPO.glob("docs/*.md"), REPO / "symattn" / "numeric" / "attention_loops.py"]
    assert len(paths) >= 9
    assert {str(p): damage(p.read_bytes()) for p in paths} == {str(p): None for p in paths}
    assert "<!-- symattn-sha256: " in (REPO / "docs" / "single-head-causal.md").read_text()


def test_hash_check_needs_no_sympy():
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('stamp', sys.argv[1]); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "print(m.damage(open(sys.argv[2], 'rb').read()), 'sympy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(REPO / "symattn" / "filestamp.py"),
                          str(REPO / "symattn" / "numeric" / "attention_loops.py")], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "False"]


def test_loading_a_valid_cached_file_needs_no_sympy(tmp_path):
    generate(SPEC, tmp_path)
    code = ("import pathlib, sys; import symattn.numeric.kernels as k; sys.modules['sympy'] = None  # import sympy fails\n"
            f"class Spec: name = {SPEC.name!r}\n"
            "print(k.load_unrolled(Spec, pathlib.Path(sys.argv[1])).__name__)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert out.stdout.strip() == f"symattn_generated_{SPEC.name}", out.stderr[-2000:]


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_cache_file_is_regenerated_with_one_line(cache, capsys, how):
    load_unrolled(SPEC)
    path = cache / NAME
    spoil, word = DAMAGE[how]
    path.write_bytes(spoil(path.read_bytes()))
    capsys.readouterr()
    module = later_run()
    err = capsys.readouterr().err.splitlines()
    assert err == [f"symattn: {path} was {word}; regenerated"]
    assert damage(path.read_bytes()) is None
    assert_matches_reference(module)


def test_cache_notice_goes_through_progress(cache, capsys):
    load_unrolled(SPEC)
    (cache / NAME).write_bytes(b"")
    lines = []
    sys.modules.pop(f"symattn_generated_{SPEC.name}")
    load_unrolled(SPEC, progress=lines.append)
    assert f"{cache / NAME} was empty; regenerated" in lines
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("body", ["def broken(:\n", "x = 1\n"], ids=["syntax error", "no kernels"])
def test_file_that_never_loads_is_regenerated_once_then_reported(cache, monkeypatch, capsys, body):
    calls = []

    def bad_generator(spec, progress=silent):
        calls.append(spec)
        return stamp(HEADER.substitute(source="a broken generator", command="none") + body)

    monkeypatch.setattr(codegen, "render_unrolled", bad_generator)
    with pytest.raises(SymattnError) as error:
        load_unrolled(SPEC)
    assert str(cache / NAME) in str(error.value) and "even after regenerating" in str(error.value)
    assert len(calls) == 2  # written, regenerated once, then reported: no loop
    assert capsys.readouterr().err.count("failed to load") == 1
    assert f"symattn_generated_{SPEC.name}" not in sys.modules


@contextlib.contextmanager
def full_disk(room: int = 4096):
    """os.write on files (not stdin/out/err) takes `room` bytes per file, then fails: the disk is full."""
    real, taken = os.write, {}

    def write(fd, data):
        if fd <= 2:
            return real(fd, data)
        left = room - taken.get(fd, 0)
        if left <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real(fd, bytes(data[:left]))
        taken[fd] = taken.get(fd, 0) + n
        return n

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "write", write)
        yield


def test_full_disk_in_the_cache_leaves_nothing_and_heals_after(cache, capsys):
    with full_disk(), pytest.raises(SymattnError, match="No space left on device") as error:
        load_unrolled(SPEC)
    assert str(cache) in str(error.value)
    assert list(cache.iterdir()) == []  # no partial file under the final name, no temporary file
    assert_matches_reference(later_run())  # space freed: the next run just works
    assert "regenerated" not in capsys.readouterr().err


def test_full_disk_keeps_the_previous_file_whole(tmp_path):
    older = restamped(render(SPEC)[NAME].replace("# Outputs", "# Outputs (older symattn)", 1)).encode()
    (tmp_path / NAME).write_bytes(older)
    with full_disk(), pytest.raises(SymattnError, match="No space left on device"):
        generate(SPEC, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [NAME]
    assert (tmp_path / NAME).read_bytes() == older
    generate(SPEC, tmp_path)  # an older generator's unedited output is simply replaced
    assert (tmp_path / NAME).read_text() == render(SPEC)[NAME]


def test_full_disk_on_a_tiny_tmpfs(tmp_path):
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(tiny)]
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("needs root to mount a tmpfs")
    try:
        with pytest.raises(SymattnError, match="No space left on device"):
            generate(SPEC, tiny)
        assert list(tiny.iterdir()) == []
        subprocess.run(["mount", "-o", "remount,size=1m", str(tiny)], check=True)  # space freed
        assert all(damage(p.read_bytes()) is None for p in generate(SPEC, tiny))
    finally:
        subprocess.run(["umount", str(tiny)], check=True)


@pytest.mark.parametrize("how", ["edited", "not UTF-8", "not ours"])
def test_generate_refuses_a_hand_edited_file_unless_forced(tmp_path, capsys, how):
    assert main([*GENERATE, "-o", str(tmp_path)]) == 0
    path = tmp_path / NAME
    spoilt = b"def mine():\n    return 1\n" if how == "not ours" else DAMAGE[how][0](path.read_bytes())
    path.write_bytes(spoilt)
    capsys.readouterr()
    assert main([*GENERATE, "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"symattn: error: refusing to overwrite {path}: ") and "--force" in err
    assert path.read_bytes() == spoilt
    assert main([*GENERATE, "-o", str(tmp_path), "--force"]) == 0
    assert path.read_text() == render(SPEC)[NAME]


@pytest.mark.parametrize("how", ["empty", "cut at 5,000 bytes"])
def test_generate_replaces_its_own_cut_short_file(tmp_path, how):
    assert main([*GENERATE, "-o", str(tmp_path)]) == 0
    path = tmp_path / NAME
    path.write_bytes(DAMAGE[how][0](path.read_bytes()))
    assert main([*GENERATE, "-o", str(tmp_path)]) == 0
    assert damage(path.read_bytes()) is None


def test_generate_never_writes_through_a_symlink(tmp_path, capsys):
    out, outside = tmp_path / "out", tmp_path / "precious.py"
    out.mkdir()
    outside.write_bytes(b"# my own work\n")
    link = out / NAME
    link.symlink_to(outside)
    assert main([*GENERATE, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"symattn: error: refusing to overwrite {link}: it is a symbolic link")
    assert outside.read_bytes() == b"# my own work\n" and link.is_symlink()
    assert main([*GENERATE, "-o", str(out), "--force"]) == 0  # the link itself is replaced
    assert not link.is_symlink() and damage(link.read_bytes()) is None
    assert outside.read_bytes() == b"# my own work\n"


def test_generated_names_never_hold_a_path(tmp_path):
    text = render(SPEC)[NAME]
    for name in ("../escape.py", "sub/x.py", "..", ""):
        with pytest.raises(ValueError, match="not a plain file name"):
            write_files({name: text}, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out"]


def test_drift_check_reads_non_utf8_files(tmp_path):
    path = tmp_path / NAME
    path.write_bytes(b"\xff\xfe not text\n")
    diffs = codegen.diff_files({path: render(SPEC)[NAME]})
    assert len(diffs) == 1 and "+# Generated by symattn" in diffs[0]


CONCURRENT = """
import pathlib, sys, time
import numpy as np
from symattn import AttentionSpec
from symattn.numeric.kernels import load_unrolled
folder, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
go.with_name(f"ready-{sys.argv[3]}").touch()
while not go.exists():
    time.sleep(0.001)
m = load_unrolled(AttentionSpec(2, 3, 2), folder)
x, o = np.ones((3, 2)), np.empty((2, 2))
m.attn_q2_k3_dk2_dv2_forward(x[:2], x, x, o)
print(o.sum())
"""


def test_two_processes_generate_the_same_spec_at_once(tmp_path):
    folder, go = tmp_path / "kernels", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(folder), str(go), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 2 and time.monotonic() < deadline:  # both imported, waiting
        time.sleep(0.01)
    go.touch()
    seen = []  # what a watcher sees under the final name while they write
    while any(p.poll() is None for p in procs):
        try:
            seen.append(damage((folder / NAME).read_bytes()))
        except FileNotFoundError:
            pass
    outs = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert [out.strip() for out, _ in outs] == ["4.0", "4.0"]
    assert damage((folder / NAME).read_bytes()) is None
    assert set(seen) <= {None}
    assert not list(folder.glob(".*.tmp"))


def test_check_outside_a_source_checkout_says_there_is_nothing_to_check(tmp_path):
    site = tmp_path / "site-packages"  # an installed, non-editable copy: no generated/ folder beside it
    shutil.copytree(REPO / "symattn", site / "symattn", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(site)}
    for option in ("--check", "--all"):
        out = subprocess.run([sys.executable, "-m", "symattn.app.cli", "generate", option, "-q"], capture_output=True,
                             text=True, env=env, cwd=tmp_path)
        assert out.returncode == 2, out.stderr[-2000:]
        assert out.stderr.startswith("symattn: error: ") and len(out.stderr.splitlines()) == 1
        assert "outside a source checkout" in out.stderr and out.stdout == ""
        assert option == "--all" or ("drifted" not in out.stderr and "--all" not in out.stderr)


def test_check_suggests_force_only_where_all_needs_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "pyproject.toml").write_text("")  # a small source checkout: one kernel file, no docs
    for name, value in (("PACKAGE_DIR", tmp_path / "symattn"), ("REPO_GENERATED", tmp_path / "generated"),
                        ("REPO_DOCS", tmp_path / "docs"), ("STANDARD_SPECS", (SPEC,)), ("DOC_SPECS", {})):
        monkeypatch.setattr(codegen, name, value)
    assert main(["generate", "--all", "-q"]) == 0 and main(["generate", "--check", "-q"]) == 0
    kernel = tmp_path / "generated" / NAME
    kernel.write_text(restamped(kernel.read_text().replace("# Outputs", "# Outputs (older symattn)", 1)))
    capsys.readouterr()
    assert main(["generate", "--check", "-q"]) == 1
    assert capsys.readouterr().err.endswith("regenerate with `symattn generate --all`\n")
    kernel.write_text(kernel.read_text().replace("# Inputs", "# Inputs (my note)", 1))  # a hand edit
    assert main(["generate", "--check", "-q"]) == 1
    err = capsys.readouterr().err
    assert "regenerate with `symattn generate --all --force`" in err and str(kernel) in err
    assert main(["generate", "--all", "-q"]) == 2 and "(my note)" in kernel.read_text()
    assert main(["generate", "--all", "--force", "-q"]) == 0 and main(["generate", "--check", "-q"]) == 0
