"""The command line: derive formats, `run`, and one-line errors with exit code 2 for bad input."""
import re
import subprocess
import sys

import pytest

from symattn.app.cli import main


def test_derive_text_to_stdout(capsys):
    assert main(["derive", "--n-q", "3", "--n-k", "4", "--d-k", "2", "--d-v", "3", "--causal", "-q"]) == 0
    out = capsys.readouterr().out
    assert "Softmax normalisation into weights" in out and "[pass]" in out and "[FAIL]" not in out


@pytest.mark.parametrize("fmt, marker", [("latex", r"\begin{align*}"), ("markdown", "```math"),
                                          ("tex", r"\documentclass")])
def test_derive_formats_to_file(tmp_path, capsys, fmt, marker):
    path = tmp_path / f"derivation.{fmt}"
    assert main(["derive", "--n-q", "2", "--n-k", "3", "--d-k", "2", "--format", fmt, "-o", str(path), "-q"]) == 0
    assert marker in path.read_text()
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("argv, message", [
    (["derive", "--n-q", "0", "--n-k", "2", "--d-k", "2"], "AttentionSpec.n_q must be a positive integer"),
    (["derive", "--n-q", "2.5", "--n-k", "2", "--d-k", "2"], "invalid int value"),
    (["derive", "--n-q", "2", "--n-k", "2", "--d-k", "2", "--scale", "-1"], "AttentionSpec.scale"),
    (["derive", "--n-q", "40", "--n-k", "40", "--d-k", "8"], "explicit-expansion limit"),
    (["derive", "--n-q", "2", "--n-k", "2", "--d-k", "2", "-o", "/no/such/folder/x.tex"], "cannot write"),
    (["derive", "--n-q", "2", "--n-k", "2", "--d-k", "2", "--format", "pdf"], "invalid choice"),
    (["derive", "--n-q", "2", "--n-k", "2", "--d-k", "2", "--query", "5"], "--query must be in 0..1"),
    (["deriv"], "invalid choice"),
    (["derive", "--n-q", "2"], "give --n-k and --d-k (one head), or --d-model and --heads"),
    (["derive", "--n-q", "2", "--heads", "2"], "a multi-head layer needs --d-model and --heads"),
    (["derive", "--n-q", "3", "--d-model", "6", "--heads", "4"], "d_model (6) is not divisible by heads (4)"),
    (["derive", "--n-q", "3", "--d-model", "4", "--heads", "4", "--kv-heads", "3"], "kv_heads must divide heads"),
    (["run", "--query", "dog"], "not in the sentence"),
    (["run", "--sentence", "   "], "no tokens"),
    (["run", "--d-k", "0"], "positive integer"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) if message in ("invalid int value", "invalid choice") else _no_raise():
        code = main(argv)
        assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("symattn: error")]) == 1
    assert message in err[-1] and "Traceback" not in "\n".join(err)


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_argparse_errors_exit_2():
    with pytest.raises(SystemExit) as e:
        main(["derive", "--n-q", "x", "--n-k", "2", "--d-k", "2"])
    assert e.value.code == 2


def test_run_main_job(capsys, tmp_path):
    plot = tmp_path / "heat.png"
    assert main(["run", "--plot", str(plot)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert '"The cat sat on the mat" (6 tokens)' in out
    assert "Forward steps for the query token \"sat\" (i = 2)" in out
    assert r"\tilde{s}_{2,0}" in out and "p_{2,5}" in out  # LaTeX of the steps for "sat"
    single, layer = out.split("Two heads:")
    table = re.findall(r"^\s+(\d)\s+(\S+)\s+(-?\d+\.\d+)\s+(\d\.\d+)$", single, flags=re.M)
    assert [t[1] for t in table] == ["The", "cat", "sat", "on", "the", "mat"]
    assert abs(sum(float(t[3]) for t in table) - 1) < 1e-3
    heads = re.findall(r"^\s+(\d)\s+(\S+)\s+(\d\.\d+)\s+(\d\.\d+)$", layer, flags=re.M)
    assert [t[1] for t in heads] == ["The", "cat", "sat", "on", "the", "mat"]
    for h in (2, 3):  # each head's weights for "sat" sum to 1, and the two heads differ
        assert abs(sum(float(t[h]) for t in heads) - 1) < 1e-3
    assert [t[2] for t in heads] != [t[3] for t in heads]
    assert re.search(r'Layer output z for "sat": \[(-?\d\.\d+, ){3}-?\d\.\d+\]', layer)
    assert re.search(r"(\d+) of \1 layer proofs passed", layer)
    assert re.search(r"numeric layer \(symattn.multihead_attention\): max \|difference\| = \d\.\de-1[5-9]", layer)
    assert re.search(r"(\d+) of \1 proofs passed\.", out)
    assert "derive 16/16" in captured.err  # progress
    assert plot.stat().st_size > 5_000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_run_causal_and_other_sentence(capsys):
    assert main(["run", "--sentence", "a b c d", "--query", "b", "--causal", "--d-model", "3", "--d-k", "2",
                 "-q"]) == 0
    out = capsys.readouterr().out
    assert "(masked)" in out and 'query token "b" (i = 1)' in out


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "symattn.app.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "derive" in result.stdout


def test_public_functions_survive_submodule_imports():
    code = ("import symattn.check.verification, symattn.check.finite_differences, symattn.symbolic.derive, symattn.symbolic.prove, symattn.numeric.api;"
            "import symattn; print(all(callable(getattr(symattn, n)) for n in "
            "('verify', 'gradcheck', 'derive', 'prove', 'attention', 'attention_backward', 'generate')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "True", result.stderr


@pytest.mark.parametrize("fmt, first", [("tex", "% Generated by symattn; regenerate with: symattn derive "),
                                        ("latex", "% Generated by symattn; regenerate with: symattn derive "),
                                        ("markdown", "<!-- Generated by symattn; regenerate with: symattn derive "),
                                        ("text", "Scaled dot-product attention")])
def test_a_written_derivation_says_what_made_it(tmp_path, capsys, fmt, first):
    """derive -o documents begin with the command that made them (a comment of their format; plain text has
    none), and that command stays on its line whatever the path holds."""
    for name in ("d", "odd\nname"):
        path = tmp_path / f"{name}.{fmt}"
        argv = ["derive", "--n-q", "2", "--n-k", "2", "--d-k", "2", "--format", fmt, "-q", "--no-prove",
                "-o", str(path)]
        assert main(argv) == 0
        head = path.read_text().splitlines()[0]
        assert head.startswith(first), head
        if fmt != "text":
            tail = str(path) if name == "d" else "a comment cannot)"
            assert head.endswith(tail + (" -->" if fmt == "markdown" else "")), head
