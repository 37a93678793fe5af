"""`symattn docs`: a documentation set for one spec, written into one folder.

    derivation.md, derivation.tex (and derivation.pdf when pdflatex is present)   the spec's derivation
    worked-example.md, worked-example.tex    `symattn run` with the spec's variant: inputs, steps, numbers, proofs
                                             (and the Document those are rendered from; worked-example.pdf too
                                             when pdflatex is present)
    heatmap.png                              the worked example's weights (one panel per head of the layer)
    verification.md                          the generated kernels against the symbolic values (symattn.verify)
    index.md                                 links to all of them

Deterministic: no clock, no timings, fixed PDF dates (SOURCE_DATE_EPOCH=0, FORCE_SOURCE_DATE=1); two builds give
the same bytes. Writes only inside the folder (atomically); progress lines go to `progress`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import SymattnError
from ..outputs import output_folder, save_figure, write_atomic
from ..progress import Progress, silent
from ..render import markdown
from ..render.latex import align
from ..render.notation import (DEFAULT, Notation, explanation_latex, explanation_markdown, explanation_text)
from .inputs import markdown_text, matrix_latex, matrix_markdown, matrix_text, tex_token

PDFLATEX_SECONDS = 300
FORMATS = ("text", "latex", "markdown", "tex")
Say = Callable[[str], None]


# -- the worked example as a document -----------------------------------------------------------------------------

class Literal(str):
    """Text printed as it is (a token): escaped in LaTeX and Markdown, never read as mathematics."""


class Prose(str):
    """A table cell in symattn's own words with $math$ (a proof's claim; never user text): typeset like an
    explanation. Other cells are printed as they are."""


@dataclass
class Document:
    """The worked example as blocks, rendered as text (what the terminal shows), LaTeX, Markdown or a .tex
    document. A block is (kind, ...): title, heading, para (pieces: prose with $math$, or Literal),
    matrix (name, what, M, row labels), step (number, title, explanation, LaTeX lines),
    table (header, rows, text lines, LaTeX column spec), pre (lines)."""

    say: Say = print
    blocks: list = field(default_factory=list)

    def add(self, *block) -> None:
        self.blocks.append(block)
        for line in _text(block):
            self.say(line)

    def render(self, fmt: str) -> str:
        if fmt not in FORMATS:
            raise SymattnError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        if fmt == "text":
            return "\n".join(line for b in self.blocks for line in _text(b)) + "\n"
        if fmt == "markdown":
            return "\n\n".join(_markdown(b) for b in self.blocks) + "\n"
        body = "\n\n".join(_latex(b) for b in self.blocks) + "\n"
        return _tex_document(body) if fmt == "tex" else body


def _pieces(pieces, prose, literal) -> str:
    return "".join(literal(p) if isinstance(p, Literal) else prose(p) for p in pieces)


def _text(block) -> list[str]:
    kind, *a = block
    if kind in ("title", "heading"):
        return ([""] if kind == "heading" else []) + [a[0]]  # a title's first text is the terminal's line
    if kind == "para":
        return [_pieces(a[0], explanation_text, str)]
    if kind == "matrix":
        return [f"{explanation_text('$' + a[0] + '$')}, {a[1]}:", *matrix_text(a[2], a[3])]
    if kind == "step":
        return [f"% {a[0]}. {explanation_text(a[1])}: {explanation_text(a[2])}",
                *("  " + " = ".join(parts) for parts in a[3]), ""]
    return a[2] if kind == "table" else a[0]


def _markdown(block) -> str:
    kind, *a = block
    if kind in ("title", "heading"):
        return ("# " if kind == "title" else "## ") + markdown_text(a[-1])
    if kind == "para":
        return _pieces(a[0], explanation_markdown, markdown_text)
    if kind == "matrix":
        return f"{markdown.math(a[0])}, {markdown_text(a[1])}:\n\n" + "\n".join(matrix_markdown(a[2], a[3]))
    if kind == "step":
        return (f"### {a[0]}. {explanation_markdown(a[1])}\n\n{explanation_markdown(a[2])}\n\n"
                + markdown.display(align(a[3], "aligned")))
    if kind == "table":
        header = [explanation_markdown(h) for h in a[0]]
        rows = [[explanation_markdown(c) if isinstance(c, Prose) else markdown_text(c) for c in row] for row in a[1]]
        return markdown.table(header, rows)
    return "```text\n" + "\n".join(a[0]) + "\n```"


def _latex(block) -> str:
    kind, *a = block
    if kind in ("title", "heading"):
        return ("\\section*{" if kind == "title" else "\\subsection*{") + tex_token(a[-1]) + "}"
    if kind == "para":
        return _pieces(a[0], explanation_latex, tex_token)
    if kind == "matrix":
        return f"${a[0]}$, {tex_token(a[1])}:\n\\[\n{matrix_latex(a[0], a[2], a[3])}\n\\]"
    if kind == "step":
        return (f"\\subsubsection*{{{a[0]}. {explanation_latex(a[1])}}}\n{explanation_latex(a[2])}\n"
                + align(a[3], "align*"))
    if kind == "table":
        rows = [" & ".join(explanation_latex(h) for h in a[0]) + r" \\ \hline"]
        rows += [" & ".join(explanation_latex(c) if isinstance(c, Prose) else tex_token(c) for c in row) + r" \\"
                 for row in a[1]]
        return "{\\small\n\\begin{tabular}{" + a[3] + "}\n" + "\n".join(rows) + "\n\\end{tabular}}"
    return "{\\small\n\\begin{verbatim}\n" + "\n".join(a[0]) + "\n\\end{verbatim}}"


def _tex_document(body: str) -> str:
    """A standalone article around the body (its first section is the title); compiles with pdflatex."""
    return "\n".join([r"\documentclass[10pt]{article}", r"\usepackage[margin=1.5cm]{geometry}",
                      r"\usepackage{amsmath,amssymb}", r"\allowdisplaybreaks", r"\setlength{\parindent}{0pt}",
                      "% the worked example of symattn run", r"\begin{document}", body, r"\end{document}", ""])


# -- heatmaps ---------------------------------------------------------------------------------------------------------

def heatmap(result, path) -> None:
    """Save the attention weights (queries × keys) as a picture (PNG, PDF, SVG or JPEG by the suffix): the
    single head, and one panel per head of the two-head layer when it ran. See heatmap_figure."""
    spec, n = result.derivation.spec, len(result.example.tokens)
    visible = np.array([[spec.visible(r, c) for c in range(n)] for r in range(n)])
    panels = [(spec.title, result.P, visible)]
    if result.layer is not None:
        layer_visible = np.array([[result.layer.spec.visible(r, c) for c in range(n)] for r in range(n)])
        panels += [(f"two-head layer, head {h}", P, layer_visible) for h, P in enumerate(result.head_P)]
    fig = heatmap_figure(panels, result.example.tokens, result.example.query)
    save_figure(fig, path)
    import matplotlib.pyplot as plt
    plt.close(fig)


def heatmap_figure(panels, tokens, query: int):
    """A matplotlib Figure with one heatmap per (title, P (n, n), visible (n, n) bool) panel: masked cells grey
    and hatched (legend), the query row framed in red, the sentence in the title. Tokens are plain text:
    matplotlib's math parser never sees them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle
    n = len(tokens)
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * (1.1 * n + 2.2), 1.0 * n + 2.4), squeeze=False)
    for ax, (title, P, visible) in zip(axes[0], panels):
        image = ax.imshow(np.ma.masked_array(P, ~visible), cmap="viridis", vmin=0.0, vmax=1.0)
        for (r, c), p in np.ndenumerate(P):
            if visible[r, c]:
                ax.text(c, r, f"{p:.2f}", ha="center", va="center", color="white" if p < 0.6 else "black")
            else:
                ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, facecolor="#d9d9d9", edgecolor="#7f7f7f",
                                       hatch="///", linewidth=0))
        ax.add_patch(Rectangle((-0.5, query - 0.5), n, 1, fill=False, edgecolor="red", linewidth=2.5))
        ax.set_xticks(range(n), tokens, rotation=45, ha="right")
        ax.set_yticks(range(n), tokens)
        ax.get_yticklabels()[query].set_color("red")
        ax.set(xlabel="key", ylabel="query")
        ax.set_title(title.replace(" (", "\n("), fontsize=9)
        fig.colorbar(image, ax=ax, label="weight p_ij", fraction=0.046, pad=0.04)
        for text in (*ax.get_xticklabels(), *ax.get_yticklabels(), ax.title):
            text.set_parse_math(False)
    legend = [Patch(facecolor="#d9d9d9", edgecolor="#7f7f7f", hatch="///", label="masked (never attended)"),
              Patch(fill=False, edgecolor="red", linewidth=2.5, label=f"query row \"{tokens[query]}\"")]
    fig.legend(handles=legend, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"\"{' '.join(tokens)}\"", fontsize=12).set_parse_math(False)
    for text in fig.legends[0].get_texts():
        text.set_parse_math(False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


# -- the documentation set ----------------------------------------------------------------------------------------

def verification_markdown(report) -> str:
    """The verification as a Markdown table: tensor, path, max abs and rel error, tolerances, result."""
    rows = [[markdown_text(c.tensor), markdown_text(c.path), f"{c.max_abs:.1e}", f"{c.max_rel:.1e}", f"{c.rtol:g}",
             f"{c.atol:g}", "pass" if c.passed else "FAIL"]
            for c in (*report.comparisons, *report.gradcheck.comparisons)]
    table = markdown.table(["tensor", "path (vs symbolic)", "max abs error", "max rel error", "rtol", "atol", "result"],
                           rows, "llrrrrl")
    verdict = "All paths agree." if report.passed else "Verification FAILED: " + "; ".join(report.failures())
    return (f"# Verification of the generated kernels\n\n`{report.spec.name}`: {markdown_text(report.spec.title)}, "
            f"inputs from `symattn verify` (seed 0). Errors are against the exact symbolic values; the finite "
            f"differences check the kernels' gradients.\n\n" + table + f"\n\n{verdict}\n")


def pdf(tex: str, workdir: str | os.PathLike) -> bytes | None:
    """The PDF pdflatex makes of `tex` in a fresh folder under `workdir` (removed after), with fixed dates;
    None when pdflatex is absent. Raises SymattnError with the log's first error when it fails."""
    if shutil.which("pdflatex") is None:
        return None
    env = {**os.environ, "SOURCE_DATE_EPOCH": "0", "FORCE_SOURCE_DATE": "1"}
    with tempfile.TemporaryDirectory(dir=workdir, prefix=".pdflatex-") as tmp:
        Path(tmp, "doc.tex").write_text(tex, encoding="utf-8")
        try:
            done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp,
                                  env=env, capture_output=True, text=True, errors="replace", timeout=PDFLATEX_SECONDS)
        except subprocess.TimeoutExpired:
            raise SymattnError(f"pdflatex ran over {PDFLATEX_SECONDS} s") from None
        if done.returncode != 0:
            first = next((line for line in done.stdout.splitlines() if line.startswith("!")), "see its log")
            raise SymattnError(f"pdflatex failed: {first}")
        return Path(tmp, "doc.pdf").read_bytes()


def worked_variant(spec) -> dict:
    """The options of `symattn.app.run.run` that give the worked example `spec`'s variant (a layer's: its mask)."""
    mask = spec.mask if isinstance(spec.mask, str) else spec.mask.text
    options = {"mask": None if mask == "none" else mask}
    if hasattr(spec, "score"):
        options.update(score=spec.score, hidden=spec.hidden, score_mod=None if spec.score_mod == "none"
                       else spec.score_mod)
    return options


def build_docs(spec, worked, out: str | os.PathLike = "symattn-docs", *, notation: Notation = DEFAULT,
               progress: Progress = silent) -> list[Path]:
    """Write the documentation set of `spec` (AttentionSpec or MultiHeadSpec) into `out`; see the module doc.
    `worked` is the worked example's RunResult, e.g. run(inputs=..., kernels=False, **worked_variant(spec)).
    Returns the files written, index.md last."""
    from ..check.verification import verify, verify_multihead
    from ..codegen import render_doc
    from ..symbolic.derive import derive
    from ..symbolic.layer import derive_multihead
    from ..symbolic.spec import MultiHeadSpec
    layer = isinstance(spec, MultiHeadSpec)
    spec.check_explicit()
    folder = output_folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def put(name: str, data) -> None:
        written.append(write_atomic(folder / name, data))
        progress(f"wrote {folder / name}")

    progress(f"deriving {spec.title}")
    d = (derive_multihead if layer else derive)(spec, progress=progress)
    tex = d.to_tex_document(notation=notation.replace(standalone=True))
    put("derivation.md", render_doc(spec, derivation=d, command=f"symattn docs {spec.cli_args()}", notation=notation))
    put("derivation.tex", tex)
    progress("compiling derivation.tex with pdflatex")
    document = pdf(tex, folder)
    if document is not None:
        put("derivation.pdf", document)
    put("worked-example.md", worked.document.render("markdown"))
    worked_tex = worked.document.render("tex")
    put("worked-example.tex", worked_tex)
    if document is not None:  # pdflatex is here: the worked example as a PDF too
        progress("compiling worked-example.tex with pdflatex")
        put("worked-example.pdf", pdf(worked_tex, folder))
    heatmap(worked, folder / "heatmap.png")
    written.append(folder / "heatmap.png")
    progress("verifying the generated kernels")
    report = (verify_multihead if layer else verify)(spec, progress=progress)
    put("verification.md", verification_markdown(report))
    put("index.md", _index(spec, worked, document is not None, d.proved and report.passed))
    return written


def _index(spec, result, with_pdf: bool, passed: bool) -> str:
    ex = result.example
    pdf_link = " ([PDF](derivation.pdf))" if with_pdf else " (no PDF: pdflatex was not found)"
    return "\n".join([
        f"# {markdown_text(spec.title)}", "",
        f"Generated by `symattn docs {spec.cli_args()}`.", "",
        f"- [The derivation](derivation.md), as [LaTeX](derivation.tex){pdf_link}: every step, indexed and matrix "
        f"forms, sample entries, the proofs.",
        f"- [The worked example](worked-example.md) ([LaTeX](worked-example.tex)"
        f"{', [PDF](worked-example.pdf)' if with_pdf else ''}): "
        f"\"{markdown_text(' '.join(ex.tokens))}\", its inputs and every forward step with its numbers for the "
        f"query token \"{markdown_text(ex.tokens[ex.query])}\".",
        "- [Verification of the generated kernels](verification.md): symbolic vs generated vs NumPy, and finite "
        "differences.", "",
        "## Attention weights of the worked example", "",
        "![Heatmap of the worked example's attention weights](heatmap.png)", "",
        "All proofs and checks passed." if passed and result.passed else "SOME PROOFS OR CHECKS FAILED.", ""])
