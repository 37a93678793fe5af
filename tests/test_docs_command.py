"""`symattn docs`: a deterministic documentation set written only inside its folder (small spec, quick)."""
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from symattn.app.cli import main

SMALL = ["--n-q", "2", "--n-k", "2", "--d-k", "1", "--causal"]
INPUTS = {"tokens": ["x", "y"], "Q": [[1], ["1/2"]], "K": [[1], [-1]], "V": [[2], [0]]}  # no layer: quick


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    (root / "inputs.json").write_text(json.dumps(INPUTS))
    for name in ("a", "b"):
        assert main(["docs", "-q", "-o", str(root / name), *SMALL, "--inputs", str(root / "inputs.json")]) == 0
    return root


def test_the_set_is_complete_and_linked(built):
    out = built / "a"
    names = {p.name for p in out.iterdir()}
    expected = {"index.md", "derivation.md", "derivation.tex", "worked-example.md", "worked-example.tex",
                "heatmap.png", "verification.md"} | ({"derivation.pdf"} if shutil.which("pdflatex") else set())
    assert names == expected  # nothing else (no pdflatex leftovers)
    index = (out / "index.md").read_text()
    for link in re.findall(r"\]\(([^)]+)\)", index):
        assert (out / link).is_file(), link
    assert "All proofs and checks passed." in index
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    derivation = (out / "derivation.md").read_text()
    assert "$$" in derivation and "causal" in derivation.lower()
    example = (out / "worked-example.md").read_text()
    assert example.index("$Q$, one row per token") < example.index("### 1. The query vectors")
    assert (out / "worked-example.tex").read_text().rstrip().endswith(r"\end{document}")


def test_verification_table(built):
    table = (built / "a" / "verification.md").read_text()
    rows = re.findall(r"^\| (\w+) \| ([^|]+) \| (\S+) \| (\S+) \| \S+ \| \S+ \| (\w+) \|$", table, re.M)
    paths = {path.strip() for _, path, *_ in rows}
    assert {"O", "dQ", "dK", "dV"} <= {t for t, *_ in rows} and "finite differences" in paths
    assert any(p.startswith("unrolled") for p in paths) and all(r[4] == "pass" for r in rows)
    assert all(float(r[2]) < 1e-4 for r in rows)
    assert " s |" not in table and "seconds" not in table  # no timings


def test_two_builds_are_identical(built):
    a, b = _snapshot(built / "a"), _snapshot(built / "b")
    assert a == b  # PDFs included: pdflatex runs with SOURCE_DATE_EPOCH=0 and FORCE_SOURCE_DATE=1


def test_writes_only_inside_the_folder(built):
    assert sorted(p.name for p in built.iterdir()) == ["a", "b", "inputs.json"]


def test_bad_options_are_refused_before_work(tmp_path, capsys):
    assert main(["docs", "-q", "-o", str(tmp_path / "x"), "--n-q", "2"]) == 2
    assert "give --n-k and --d-k" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["docs", "-q", "-o", str(tmp_path / "file" / "x"), *SMALL]) == 2
    assert "not a writable folder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_worked_example_tex_compiles_without_overfull_boxes(tmp_path):
    """`symattn run -o FILE.tex` (default sentence, with the two-head layer): compiles; no box over 5 pt."""
    import subprocess
    from symattn.app.run import run
    result = run(say=lambda line: None, kernels=False)
    tex = result.document.render("tex")
    assert tex.index(r"\text{sat}") < tex.index(r"{1. The query vectors}")  # inputs labelled by token first
    assert "row 2 of $P$" in tex and "proofs passed" in tex and "layer proofs passed" in tex
    (tmp_path / "we.tex").write_text(tex)
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "we.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:]
    log = (tmp_path / "we.log").read_text(errors="replace")
    over = [float(x) for x in re.findall(r"Overfull \\hbox \(([\d.]+)pt too wide\)", log)]
    assert all(x <= 5 for x in over), over
