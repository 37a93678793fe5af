"""Issue 7 §2–5: sizes checked before allocation, bounded scales, `run` and plot paths, and clean errors from
the numeric APIs. Each case failed on the code before the fix (a traceback, an allocation of hundreds of MB,
a hang, or a wrong file name)."""
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from fractions import Fraction

import numpy as np
import pytest

import symattn
from symattn import AttentionSpec, InputError, SpecError, reference
from symattn.app.cli import main


def _error(argv, capsys) -> str:
    """Run the CLI; it must exit 2 with one `symattn: error:` line and no traceback. Returns that line."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("symattn: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


# -- §2 sizes before allocation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["verify", "--n-q", "2", "--n-k", "10000000", "--d-k", "2"], "explicit-expansion limit"),
    (["verify", "--n-q", "3", "--d-model", "3000", "--heads", "1"], "explicit-expansion limit"),
])
def test_verify_refuses_before_allocating(argv, message, capsys):
    # before: the random inputs (160 MB, 72 MB per weight) were drawn before the size was checked
    _error(argv + ["-q"], capsys)  # imports SymPy and Numba: measure the second call
    peak = _peak_bytes(lambda: _error(argv + ["-q"], capsys))
    assert peak < 5_000_000


@pytest.mark.parametrize("argv, message", [
    (["run", "--d-model", "9"], "--d-model 9 is over the worked example's limit of 8"),
    (["run", "--sentence", " ".join("abcdefghijklmnop")], "16 tokens"),
    (["run", "--sentence", "a b c d e f g h", "--d-model", "8", "--d-k", "8"], "tokens × width <= 36"),
])
def test_run_refuses_sizes_it_cannot_finish_soon(argv, message, capsys):
    line = _error(argv + ["-q"], capsys)
    assert message in line and "symattn derive --indexed-only" in line


def test_attention_weights_builds_no_identity(rng):
    q, k = rng.normal(size=(1, 2, 3)), rng.normal(size=(1, 4000, 3))
    mask = rng.random((2, 4000)) > 0.3
    got = symattn.attention_weights(q, k, mask=mask)  # compile first, then measure
    peak = _peak_bytes(lambda: symattn.attention_weights(q, k, mask=mask))
    assert peak < 2_000_000  # an n_k x n_k identity is 128 MB
    np.testing.assert_allclose(got, reference.weights(q, k, mask=mask), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype, causal, policy", [(np.float32, True, "uniform"), (np.float64, False, "nan")])
def test_attention_weights_broadcasts_like_the_reference(rng, dtype, causal, policy):
    q, k = rng.normal(size=(2, 1, 5, 3)).astype(dtype), rng.normal(size=(1, 3, 4, 3)).astype(dtype)
    mask = np.ones((5, 4), bool)
    mask[1] = False  # a fully masked row follows the policy
    got = symattn.attention_weights(q, k, mask=mask, is_causal=causal, masked_rows=policy, scale=0.7)
    want = reference.weights(q.astype(float), k.astype(float), mask=mask, is_causal=causal, masked_rows=policy,
                             scale=0.7)
    assert got.shape == (2, 3, 5, 4) and got.dtype == dtype
    np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)


def test_outputs_that_cannot_fit_are_refused_before_allocation():
    q = np.zeros((1, 200_000, 2))
    with pytest.raises(InputError, match="attention_weights' output .* over the limit"):
        symattn.attention_weights(q, q)  # 200,000² doubles = 298 GiB


# -- §3 scale edge cases ------------------------------------------------------------------------------------------

def test_a_huge_scale_exponent_is_refused_at_once():
    # before: Fraction('1e100000000') computed 10**100000000 (over 90 s)
    code = "from symattn.app.cli import main; raise SystemExit(main(['derive', '--n-q', '2', '--n-k', '2', " \
           "'--d-k', '2', '-q', '--scale', '1e100000000']))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "scale must be between 1e-6 and 1e6" in result.stderr


@pytest.mark.parametrize("scale", ["1e1000000", "1e300", "1e-300", "1e20", "0", "-2", "nan", "1/0", "x",
                                   "0.1234567890123456789012345"])
def test_bad_scales_are_one_line_errors(scale, capsys):
    line = _error(["verify", "--n-q", "2", "--n-k", "2", "--d-k", "2", "-q", "--scale", scale], capsys)
    assert "AttentionSpec.scale" in line


def test_file_names_stay_short_whatever_the_scale():
    long = AttentionSpec(2, 2, 2, scale="0.08838834764831845")
    assert len(long.name) < 64 and long.name.startswith("attn_q2_k2_dk2_dv2_scale_")
    assert long.name != AttentionSpec(2, 2, 2, scale="0.08838834764831846").name
    assert AttentionSpec(2, 2, 2, scale="1/8").name == "attn_q2_k2_dk2_dv2_scale1o8"  # short ones stay readable
    assert AttentionSpec(2, 2, 2, scale=1e6).scale == 10**6 and AttentionSpec(2, 2, 2, scale=1e-6).scale == \
        Fraction(1, 10**6)


def test_spec_accepts_numpy_and_fraction_scales():
    assert AttentionSpec(2, 2, 2, scale=np.float32(0.5)).scale == Fraction(1, 2)
    assert AttentionSpec(2, 2, 2, scale=np.int64(2)).scale == 2
    assert AttentionSpec(2, 2, 2, scale=Fraction(1, 3)).scale == Fraction(1, 3)
    with pytest.raises(SpecError, match="scale"):
        AttentionSpec(2, 2, 2, scale=True)


# -- §4 run and plots ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("plot, message", [("x.jpgx", "the format '.jpgx' is not one of"),
                                           ("newdir/", "give a file name, not a folder"),
                                           ("no/such/folder/p.png", "does not exist")])
def test_plot_paths_are_checked_before_any_work(plot, message, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("symattn.app.run.run", lambda *a, **k: pytest.fail("the work started"))
    assert message in _error(["run", "--plot", plot, "-q"], capsys)


def test_run_bad_sizes_and_text(capsys):
    assert "d_model must be a positive integer" in _error(["run", "--d-model", "-1", "-q"], capsys)
    assert "not valid UTF-8" in _error(["run", "--sentence", "a \udcff b", "-q"], capsys)


def test_run_with_math_like_tokens_on_an_ascii_terminal(tmp_path):
    """Tokens reach neither matplotlib's math parser nor an encoder that raises; the plot's real name is reported."""
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "SYMATTN_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "symattn.app.cli", "run", "-q", "--sentence", "a $x^$ \u732b",
                             "--plot", str(tmp_path / "heat")], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "\\u732b" in result.stdout  # the token, escaped for the ASCII terminal
    assert f"written to {tmp_path / 'heat.png'}" in result.stdout
    png = (tmp_path / "heat.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[-8:-4] == b"IEND"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "heat.png"]  # no temporary left behind


# -- §5 smaller ones ----------------------------------------------------------------------------------------------

def test_negative_seed(capsys):
    assert "non-negative integer" in _error(["verify", "--n-q", "2", "--n-k", "2", "--d-k", "2", "--seed", "-1"],
                                            capsys)
    with pytest.raises(symattn.SymattnError, match="seed must be a non-negative integer"):
        symattn.verify(AttentionSpec(2, 2, 2), seed=-1)


def test_bench_output_is_checked_first(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("symattn.app.bench.run_case", lambda *a, **k: pytest.fail("the timing started"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert "is not a writable folder" in _error(["bench", "--quick", "-q", "-o", str(blocker / "sub")], capsys)


X = np.random.default_rng(0).normal(size=(2, 3, 4))
W = np.random.default_rng(1).normal(size=(4, 4))


@pytest.mark.parametrize("kwargs, message", [
    (dict(mask=np.ones(3, bool)), r"mask must have shape \(..., n_q, n_k\)"),
    (dict(mask=np.array(True)), r"mask must have shape \(..., n_q, n_k\)"),
    (dict(mask=np.ones((5, 3, 3), bool)), "leading .batch. dims do not broadcast"),
    (dict(y=np.zeros((2, 0, 4))), "n_k >= 1"),
    (dict(is_causal=[[1], [1, 2]]), "is_causal must be True or False"),
    (dict(is_causal=np.array([True, False])), "is_causal must be True or False"),
    (dict(scale="0.5"), "scale must be a positive finite real number"),
    (dict(masked_rows=["zero"]), "masked_rows must be one of"),
])
@pytest.mark.parametrize("backward", [False, True])
def test_multihead_api_errors_name_the_argument(kwargs, message, backward):
    with pytest.raises(InputError, match=message):
        if backward:
            symattn.multihead_attention_backward(X, W, W, W, W, X, heads=2, **kwargs)
        else:
            symattn.multihead_attention(X, W, W, W, W, heads=2, **kwargs)


@pytest.mark.parametrize("x", [np.zeros((0, 3, 4)), np.zeros((2, 0, 4))[:, :0]], ids=["batch 0", "n_q 0 (cross)"])
def test_multihead_api_empty_queries(x):
    y = np.ones((2, 3, 4)) if x.shape[0] else None
    out = symattn.multihead_attention(x, W, W, W, W, heads=2, y=y)
    assert out.shape == np.broadcast_shapes(x.shape[:-2], () if y is None else y.shape[:-2]) + (x.shape[-2], 4)
    grads = symattn.multihead_attention_backward(x, W, W, W, W, np.zeros_like(out), heads=2, y=y)
    assert grads["x"].shape == x.shape and not np.any(grads["w_q"])


@pytest.mark.parametrize("scale", [np.int64(2), Fraction(1, 2), np.array(0.5), np.float32(0.5), 2, 0.5],
                         ids=repr)
def test_every_real_scalar_is_a_scale(scale, rng):
    q, k, v = (rng.normal(size=(2, 3, 4)) for _ in range(3))
    want = reference.attention(q, k, v, scale=float(scale))
    np.testing.assert_allclose(symattn.attention(q, k, v, scale=scale), want, rtol=1e-12)
    np.testing.assert_allclose(symattn.multihead_attention(X, W, W, W, W, heads=2, scale=scale),
                               reference.multihead_attention(X, W, W, W, W, heads=2, scale=float(scale)), rtol=1e-10)


@pytest.mark.parametrize("scale", [True, "0.5", 0, -1.0, np.nan, np.inf, np.array([0.5]), 1 + 2j, 10 ** 400,
                                   Fraction(10 ** 400, 3)], ids=lambda s: repr(s)[:20])
def test_non_scales_are_refused(scale, rng):
    q = rng.normal(size=(2, 3, 4))
    with pytest.raises(InputError, match="scale must be a positive finite"):
        symattn.attention(q, q, q, scale=scale)


def test_ctrl_c_during_start_up_is_one_line():
    """SIGINT while the CLI imports SymPy and Numba: 'symattn: interrupted', never a traceback."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    for delay in (0.4, 0.8):
        proc = subprocess.Popen([sys.executable, "-m", "symattn.app.cli", "derive", "--n-q", "3", "--n-k", "3", "--d-k",
                                 "2", "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
        assert proc.returncode in (0, 130, -signal.SIGINT), err


@pytest.mark.parametrize("dtype", [">f4", ">f8"])
def test_big_endian_inputs_give_the_native_results(rng, dtype):
    """Arrays in non-native byte order (read from a file, say) used to reach Numba and stop with a TypingError
    traceback; they are now converted and give the native arrays' results, plain, causal, with a score mod and
    through the vjp."""
    q, k, v, d_o = (rng.standard_normal((2, 5, 3)) for _ in range(4))
    native = np.dtype(dtype).newbyteorder("=")
    big = [x.astype(dtype) for x in (q, k, v, d_o)]
    small = [x.astype(native) for x in (q, k, v, d_o)]
    for kw in ({}, dict(is_causal=True), dict(score_mod="alibi")):
        np.testing.assert_array_equal(symattn.attention(*big[:3], **kw), symattn.attention(*small[:3], **kw))
    got = symattn.attention_vjp(*big[:3])[1](big[3])
    want = symattn.attention_vjp(*small[:3])[1](small[3])
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


@pytest.mark.parametrize("command", [["generate", "--n-q", "2", "--n-k", "3", "--d-k", "2", "-q"], ["docs", "-q"],
                                     ["bench", "--quick", "-q"]])
def test_an_empty_output_folder_name_is_refused_not_taken_for_the_current_folder(command, tmp_path, capsys,
                                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("symattn.app.bench.run_case", lambda *a, **k: pytest.fail("the timing started"))
    assert "cannot write into '': give a folder name" in _error([*command, "-o", ""], capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, a folder that refuses new files")
@pytest.mark.parametrize("argv", [["run", "-q", "-o", "/proc/x.tex"], ["run", "-q", "--plot", "/proc/x.png"],
                                  ["docs", "-q", "-o", "/proc/x"]])
def test_a_folder_that_refuses_files_is_found_before_any_work(argv, capsys, monkeypatch):
    """os.access says yes to root everywhere: /proc refused only when written, after the proofs (run), or with a
    traceback from mkdir (docs). A temporary file made and removed up front finds it."""
    monkeypatch.setattr("symattn.app.run.run", lambda *a, **k: pytest.fail("the work started"))
    assert "the folder '/proc' refuses new files" in _error(argv, capsys)


@pytest.mark.parametrize("argv, word", [
    (["run", "-q", "--sentence", "a\x1b[31m b c"], "the sentence: token 0 holds the control character U+001B"),
    (["run", "-q", "--sentence", "a b c", "--query", "b\x07"], "the query: token 0 holds the control character U+0007"),
    (["docs", "-q", "--sentence", "a b\x00 c"], "the sentence: token 1 holds the control character U+0000"),
])
def test_control_characters_in_words_are_refused(argv, word, capsys, tmp_path, monkeypatch):
    """ESC reached the terminal raw (ANSI sequences took effect) and stopped pdflatex, after docs had written half
    its folder. Tokens from an inputs file were already refused so; a sentence's now are, before any work."""
    monkeypatch.chdir(tmp_path)
    assert word in _error(argv, capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, word", [(["run", "-q", "--query", ""], "the query is empty"),
                                        (["run", "-q", "--query", "  "], "the query is empty"),
                                        (["run", "-q", "--inputs", "."], ".: a folder, not a file")])
def test_an_empty_query_and_a_folder_of_inputs_are_named(argv, word, capsys):
    """--query "" once fell back to the first token silently; --inputs . said "no such inputs file"."""
    assert word in _error(argv, capsys)


def test_an_inf_at_a_masked_key_stays_out_of_the_loop_kernels_and_the_tiles_follow_the_reference(rng, monkeypatch):
    """As the README says: v = inf at key 4 of a causal (6, 3) element. The loop kernels skip masked keys, so the
    rows that cannot see key 4 stay finite; the tile kernels multiply their weight 0 by inf inside a BLAS tile, as
    the reference does (0·inf = NaN); with finite inputs both equal the reference (adversarial round 6)."""
    from symattn.numeric import kernels
    q, k, v = (rng.standard_normal((1, 6, 3)) for _ in range(3))
    v[0, 4, 0] = np.inf
    loops = symattn.attention(q, k, v, is_causal=True)
    assert np.isfinite(loops[0, :4]).all() and not np.isfinite(loops[0, 4:, 0]).any()
    monkeypatch.setattr(kernels, "SMALL", 0)
    tiles = symattn.attention(q, k, v, is_causal=True)
    np.testing.assert_array_equal(np.isfinite(tiles), np.isfinite(reference.attention(q, k, v, is_causal=True)))
    v[0, 4, 0] = 1.0
    want = reference.attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(symattn.attention(q, k, v, is_causal=True), want, rtol=1e-12)
    monkeypatch.setattr(kernels, "SMALL", 1 << 62)
    np.testing.assert_allclose(symattn.attention(q, k, v, is_causal=True), want, rtol=1e-12)
