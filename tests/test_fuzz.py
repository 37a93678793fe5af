"""Fuzzing (hypothesis) of the command line and the numeric API with random sizes, scales, dtypes, masks, shapes
and paths. Whatever the input: exit code 0, 1 or 2 only, never a traceback, never a file outside the output
folder, never a partial file; and where a numeric call succeeds, agreement with the NumPy reference.

SYMATTN_FUZZ_EXAMPLES raises the number of examples (CI runs a fixed, derandomized set)."""
import contextlib
import hashlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import symattn
from symattn import reference
from symattn.app.cli import main

EXAMPLES = int(os.environ.get("SYMATTN_FUZZ_EXAMPLES", "0"))


def fuzz(examples: int):
    """One settings policy: no deadline, derandomized in CI (SYMATTN_FUZZ_EXAMPLES unset), no example database."""
    return settings(max_examples=EXAMPLES or examples, deadline=None, derandomize=not EXAMPLES, database=None,
                    suppress_health_check=list(HealthCheck))

# -- the command line ---------------------------------------------------------------------------------------------

GOOD_SIZE = st.integers(1, 3).map(str)
BAD_SIZE = st.sampled_from(["0", "-1", "10000000000", "2.5", "x", "", "1e3"])
GOOD_SCALE = st.sampled_from(["0.5", "1/8", "2", "0.08838834764831845"])
BAD_SCALE = st.one_of(st.sampled_from(["1e100000000", "1e-300", "1e20", "nan", "-1", "1/0", "1e1000000"]),
                      st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=6))
#: Output paths, relative to the sandbox's `work` folder: plain and nested ones, and then missing folders, folders,
#: a symlink that points outside, a file where a folder is expected, /proc, odd suffixes.
GOOD_PATH = st.sampled_from(["out/x.tex", "out/new/deeper/", "out/heat", "out/p.svg", "out/a b.png",
                             "out/\u732b.md", "../outside/x.tex"])
BAD_PATH = st.sampled_from(["out/", "missing/x.tex", "link/x.tex", "out/link.tex", "file.txt/x", "/proc/version",
                            "", "out/p.jpgx"])
GOOD_VARIANT = st.sampled_from([[], ["--score", "general"], ["--score", "additive", "--hidden", "2"],
                                ["--mask", "window:1"], ["--mask", "prefix:1|causal"], ["--score-mod", "alibi"],
                                ["--score-mod", "softcap:3"], ["--score-mod", "relative-bias:1"]])
BAD_VARIANT = st.sampled_from([["--score", "cosine"], ["--score", "additive"], ["--hidden", "2"],
                               ["--mask", "window:"], ["--mask", "causal&"], ["--mask", "window:1", "--causal"],
                               ["--score-mod", "softcap:0"], ["--score-mod", "relative-bias:-1"],
                               ["--score", "additive", "--hidden", "2", "--scale", "2"]])
GOOD_WORDS = st.lists(st.sampled_from(["the", "cat", "$x^$", "\\frac{", "\u732b", "sat", "%", "{}"]),
                      min_size=1, max_size=3).map(" ".join)
BAD_WORDS = st.sampled_from(["", "a\udcffb c", " ".join("abcdefghij")])


def _pick(draw, broken: str | None, what: str, good, bad):
    """The bad strategy's value where `what` is the piece this example breaks, else the good one's."""
    return draw(bad if broken == what else good)


@st.composite
def spec_args(draw, broken, layer_ok=True):
    size = lambda: _pick(draw, broken, "size", GOOD_SIZE, BAD_SIZE)  # noqa: E731
    args = ["--n-q", size()]
    if layer_ok and draw(st.booleans()):
        args += ["--d-model", draw(st.sampled_from(["2", "4"] if broken != "size" else ["3", "0", "1000000"])),
                 "--heads", draw(st.sampled_from(["1", "2"] if broken != "size" else ["3", "-2"]))]
        args += draw(st.sampled_from([[], ["--kv-heads", "1"], ["--bias"], ["--cross", "--n-k", "2"]]))
    else:
        args += ["--n-k", size(), "--d-k", size()] + draw(st.sampled_from([[], ["--d-v", "2"]]))
        args += _pick(draw, broken, "variant", GOOD_VARIANT, BAD_VARIANT)
    if "--mask" not in args:
        args += draw(st.sampled_from([[], ["--causal"]]))
    if broken == "scale" or draw(st.booleans()):
        args += ["--scale", _pick(draw, broken, "scale", GOOD_SCALE, BAD_SCALE)]
    return args


@st.composite
def argvs(draw):
    """Half the examples well-formed (they do the real work); the others break one piece."""
    command = draw(st.sampled_from(["derive", "generate", "verify", "run", "nonsense"]))
    broken = draw(st.sampled_from([None, None, None, None, "size", "scale", "path", "other", "variant"]))
    path = lambda: _pick(draw, broken, "path", GOOD_PATH, BAD_PATH)  # noqa: E731
    if command == "derive":
        argv = ["derive", *draw(spec_args(broken)), "--format",
                _pick(draw, broken, "other", st.sampled_from(["text", "latex", "markdown", "tex"]), st.just("pdf"))]
        argv += draw(st.sampled_from([[], ["--indexed-only"], ["--no-prove"], ["--query", "0"]] if broken != "other"
                                     else [["--query", "-3"], ["--max-entries", "x"]]))
        if broken == "path" or draw(st.booleans()):
            argv += ["-o", path()]
    elif command == "generate":
        argv = ["generate", *draw(spec_args(broken)), "-o", path()]
    elif command == "verify":
        argv = ["verify", *draw(spec_args(broken, layer_ok=False)), "--seed",
                _pick(draw, broken, "other", st.sampled_from(["0", "3"]), st.sampled_from(["-1", "x"]))]
    elif command == "run":
        argv = ["run", "--sentence", _pick(draw, broken, "other", GOOD_WORDS, BAD_WORDS), "--d-model", "2",
                "--d-k", "2"]
        argv += draw(st.sampled_from([[], ["--query", "cat"], ["--causal"]]))
        if broken == "path" or draw(st.booleans()):
            argv += ["--plot", path()]
    else:
        argv = [command, *draw(st.lists(st.text(max_size=5), max_size=3))]
    return argv + draw(st.sampled_from([["-q"], []]))


def _snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below root (links are recorded, not followed)."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            files[str(path.relative_to(root))] = "link->" + os.readlink(path)
        elif path.is_file():
            files[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def _output_folders(argv: list[str], work: Path) -> list[Path]:
    """The real folders a command may write into: the folder of -o/--plot (generate: -o itself). A folder the user
    names through a link is that link's target; a link at the file name itself must never be written through."""
    folders = []
    for flag in ("-o", "--plot"):
        if flag in argv and argv.index(flag) + 1 < len(argv):
            target = work / argv[argv.index(flag) + 1]  # an absolute value replaces `work`
            folders.append(target if argv[0] == "generate" else target.parent)
    return [Path(os.path.realpath(f)) for f in folders]


def _assert_complete(path: Path, argv: list[str]) -> None:
    """A file a command left is whole: no temporary; a generated module or page carrying a valid content hash;
    a whole picture from `run --plot`; a whole document from `derive -o` in its --format."""
    from symattn.filestamp import damage
    assert not path.name.endswith(".tmp"), f"temporary file left behind: {path}"
    data = path.read_bytes()
    assert data, f"empty file {path}"
    if argv[0] == "generate" or data.startswith((b"# Generated by symattn", b"<!-- Generated by symattn")):
        assert damage(data) is None, f"generated file {path} is not whole: {damage(data)}"
    elif argv[0] == "run":
        kind = path.suffix.lower()
        if kind == ".png":
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[-8:-4] == b"IEND", f"partial PNG {path}"
        elif kind == ".svg":
            assert data.rstrip().endswith(b"</svg>"), f"partial SVG {path}"
    elif argv[0] == "derive":
        text = data.decode("utf-8")
        fmt = argv[argv.index("--format") + 1]
        whole = {"tex": "\\end{document}", "latex": "\\end{tabular}" if "--no-prove" not in argv and
                 "--indexed-only" not in argv else "", "text": "", "markdown": ""}[fmt]
        assert text.rstrip().endswith(whole), f"partial {fmt} document {path}"


@pytest.fixture(scope="module")
def sandbox():
    """work/ (the current folder, with out/, a file, and a link to outside/) beside outside/ and cache/."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "outside").mkdir()
        (root / "outside" / "x.tex").write_text("a file outside the output folder\n")
        work = root / "work"
        (work / "out").mkdir(parents=True)
        (work / "file.txt").write_text("not a folder\n")
        (work / "link").symlink_to(root / "outside")
        (work / "out" / "link.tex").symlink_to(root / "outside" / "x.tex")
        yield root


@fuzz(100)
@given(argv=argvs())
def test_cli_never_crashes_and_writes_only_where_asked(sandbox, argv):
    work, cache, outside = sandbox / "work", sandbox / "cache", Path(os.path.abspath(sandbox / "outside"))
    before = {"work": _snapshot(work), "outside": _snapshot(outside)}
    out, err = io.StringIO(), io.StringIO()
    old_cwd, old_cache = os.getcwd(), os.environ.get("SYMATTN_CACHE")
    os.chdir(work)
    os.environ["SYMATTN_CACHE"] = str(cache)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse: usage errors (2) and --help (0)
                code = e.code
    finally:
        os.chdir(old_cwd)
        os.environ.pop("SYMATTN_CACHE") if old_cache is None else os.environ.update(SYMATTN_CACHE=old_cache)
    event(f"{argv[0]} exit {code}")
    assert code in (0, 1, 2), (argv, code, err.getvalue()[-2000:])
    assert "Traceback" not in err.getvalue() + out.getvalue(), (argv, err.getvalue()[-3000:])
    if code == 2:
        assert "symattn: error:" in err.getvalue(), (argv, err.getvalue())
    allowed = _output_folders(argv, work)
    after = {"work": _snapshot(work), "outside": _snapshot(outside)}
    for root, name in ((work, "work"), (outside, "outside")):
        for rel, digest in after[name].items():
            if before[name].get(rel) != digest:
                path = root / rel
                assert Path(os.path.realpath(path.parent)) in allowed, (argv, f"wrote {path} outside {allowed}")
                assert not path.is_symlink(), (argv, f"{path} is a link symattn left or wrote through")
                _assert_complete(path, argv)
    for path in cache.rglob("*"):
        if path.is_file() and path.suffix == ".py":
            _assert_complete(path, argv)


# -- the numeric API ----------------------------------------------------------------------------------------------

def _batch(mask) -> tuple[int, ...]:
    return () if mask is None or np.ndim(mask) < 2 else np.shape(mask)[:-2]


DTYPES = [np.float32, np.float64, np.float16, np.int32, np.bool_, np.complex128]
TOL = {np.float64: 1e-9, np.float32: 2e-3}


@st.composite
def problems(draw):
    batch = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
    n_q, n_k, d_k, d_v = (draw(st.sampled_from([*range(1, 17), 0])) for _ in range(4))  # zero-size now and then
    dtype = draw(st.sampled_from(DTYPES if draw(st.integers(0, 9)) == 0 else DTYPES[:2]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))

    def array(shape):
        return (rng.standard_normal(shape) * 2).astype(dtype)
    k_batch = draw(st.sampled_from([batch, batch[-1:], (), (5,)]))
    q, k, v = array(batch + (n_q, d_k)), array(k_batch + (n_k, d_k)), array(k_batch + (n_k, draw(
        st.sampled_from([d_v, d_v + 1]))))[..., :d_v]  # sometimes a non-contiguous view
    broken = draw(st.sampled_from([None] * 6 + ["mask", "is_causal", "scale", "masked_rows"]))  # mostly valid
    mask = draw(st.sampled_from(["flat", "wrong", "int"] if broken == "mask" else [None, "bool", "float", "batch"]))
    mask = {None: None, "bool": rng.random((n_q, n_k)) > 0.4, "float": rng.standard_normal((n_q, n_k)),
            "batch": rng.random((2, 1, n_q, n_k)) > 0.2, "flat": np.ones(n_k, bool),
            "wrong": np.ones((n_q + 1, n_k), bool), "int": np.ones((n_q, n_k), np.int64)}[mask]
    options = dict(mask=mask,
                   is_causal=draw(st.sampled_from([[True], 1, np.array([True])] if broken == "is_causal" else
                                                  [False, True, np.True_])),
                   scale=draw(st.sampled_from([-1.0, np.nan, "1", 0] if broken == "scale" else
                                              [None, 0.5, 2, np.float32(0.3), np.int64(1)])),
                   masked_rows=draw(st.sampled_from(["bogus", None] if broken == "masked_rows" else
                                                    ["zero", "uniform", "nan"])))
    return q, k, v, options


@fuzz(150)
@given(problem=problems(), which=st.sampled_from(["attention", "attention_backward", "attention_weights"]))
def test_numeric_api_is_right_or_refuses(problem, which):
    q, k, v, options = problem
    try:
        if which == "attention":
            got = [symattn.attention(q, k, v, **options)]
        elif which == "attention_weights":
            got = [symattn.attention_weights(q, k, **options)]
        else:
            try:
                dO = np.ones(np.broadcast_shapes(q.shape[:-2], k.shape[:-2], _batch(options["mask"])) +
                             (q.shape[-2], v.shape[-1]), q.dtype)
            except ValueError:  # batch dims that do not broadcast: the API must refuse them
                dO = np.ones(q.shape, q.dtype)
            got = symattn.attention_backward(q, k, v, dO, **options)
    except symattn.InputError as e:
        event(f"refused: {str(e).split(',')[0][:40]}")
        return
    event("computed")
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    if which == "attention":
        want = [reference.attention(q64, k64, v64, **options)]
    elif which == "attention_weights":
        want = [reference.weights(q64, k64, **options)]
    else:
        want = reference.attention_backward(q64, k64, v64, dO.astype(np.float64), **options)
    tol = TOL[q.dtype.type]
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == q.dtype
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * max(1.0, float(np.nanmax(np.abs(w), initial=0))))


@st.composite
def layers(draw):
    valid = draw(st.integers(0, 3)) > 0  # three times in four a well-formed layer
    heads = draw(st.sampled_from([1, 2, 4] if valid else [0, 3, -1]))
    kv = draw(st.sampled_from([None, 1, heads] if valid else [None, 3, 2]))
    d_model, n, batch = draw(st.integers(1, 8)), draw(st.integers(0 if not valid else 1, 5)), tuple(
        draw(st.lists(st.integers(0, 2), max_size=1)))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    dtype = draw(st.sampled_from([np.float64, np.float32] if valid else [np.float64, np.float16]))
    width = draw(st.sampled_from([heads, 2 * heads] if valid else [d_model + 1]))

    def array(*shape):
        return (rng.standard_normal(shape) * 0.7).astype(dtype)
    g = kv or max(heads, 1)
    x = array(*batch, n, d_model)
    ws = (array(d_model, width), array(d_model, g * max(width // max(heads, 1), 1)),
          array(d_model, g * max(width // max(heads, 1), 1)), array(width, d_model))
    mask = draw(st.sampled_from([None, "bool", "batch"] if valid else [None, "flat", "wrong batch"]))
    mask = {None: None, "bool": rng.random((n, n)) > 0.3, "flat": np.ones(n, bool),
            "batch": rng.random((3,) + (1,) * len(batch) + (n, n)) > 0.3,
            "wrong batch": np.ones((7, 1, n, n), bool)}[mask]
    return x, ws, dict(heads=heads, kv_heads=kv, mask=mask, is_causal=draw(st.booleans()),
                       scale=draw(st.sampled_from([None, 0.5, np.int64(1)])))


@fuzz(80)
@given(problem=layers(), backward=st.booleans())
def test_multihead_api_is_right_or_refuses(problem, backward):
    x, ws, options = problem
    try:
        if backward:
            d_out = np.ones(np.broadcast_shapes(x.shape[:-2], _batch(options["mask"])) + x.shape[-2:], x.dtype)
            got = symattn.multihead_attention_backward(x, *ws, d_out, **options)
        else:
            got = symattn.multihead_attention(x, *ws, **options)
    except symattn.InputError as e:
        event(f"refused: {str(e).split(',')[0][:40]}")
        return
    event("computed")
    x64, ws64 = x.astype(np.float64), [w.astype(np.float64) for w in ws]
    tol = TOL[x.dtype.type]
    if backward:
        want = reference.multihead_attention_backward(x64, *ws64, d_out.astype(np.float64), **options)
        assert set(got) == set(want)
        pairs = [(got[n], want[n]) for n in want]
    else:
        pairs = [(got, reference.multihead_attention(x64, *ws64, **options))]
    for g, w in pairs:
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * max(1.0, float(np.nanmax(np.abs(w), initial=0))))
