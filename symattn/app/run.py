"""The main job: derive, prove and explain attention on a small sentence (`symattn run`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import sympy

from ..errors import SymattnError

from .. import limits
from ..numeric import reference
from ..symbolic.tensors import shape_of
from ..symbolic.derive import Derivation, derive
from .example import Example, example
from ..render.latex import proof_lines, step_latex
from ..outputs import save_figure
from ..progress import Progress, silent
from ..symbolic.layer import derive_multihead
from ..numeric.layer import multihead_attention
from ..symbolic.spec import AttentionSpec, MultiHeadSpec, _positive_int
from ..check.verification import verify

Say = Callable[[str], None]


@dataclass(frozen=True)
class RunResult:
    example: Example
    derivation: Derivation
    P: np.ndarray  # (n, n) weights evaluated from the exact symbolic values
    P_reference: np.ndarray  # (n, n) NumPy reference
    report: object = None  # verification.VerifyReport of the generated kernels
    layer: Derivation | None = None  # the two-head layer, with its proofs

    @property
    def passed(self) -> bool:
        return (self.derivation.proved and (self.report is None or self.report.passed)
                and (self.layer is None or self.layer.proved))

    @property
    def agreement(self) -> float:
        return float(np.max(np.abs(self.P - self.P_reference)))


def exact_values(d: Derivation, inputs: dict[str, sympy.Matrix]) -> dict[sympy.Symbol, sympy.Expr]:
    """Exact value of every forward element symbol, from exact input matrices keyed by tensor name."""
    t = d.table
    values = {}
    for name, M in inputs.items():
        values.update({t[name][r, c]: M[r, c] for r in range(M.rows) for c in range(M.cols)})
    for step in d.forward():
        if not step.is_input:
            for index in np.ndindex(*shape_of(step.explicit)):
                values[step.symbols[index]] = step.explicit[index].xreplace(values)
    return values


def _weights_table(ex: Example, d: Derivation, values: dict) -> list[str]:
    i = ex.query
    rows = [f"  {'j':>2}  {'token':<12} {'score s_ij':>12} {'weight p_ij':>12}"]
    for j, token in enumerate(ex.tokens):
        s = float(values[d.table["S"][i, j]])
        p = float(values[d.table["P"][i, j]])
        mark = "  (masked)" if not d.spec.visible(i, j) else ""
        rows.append(f"  {j:>2}  {token:<12} {s:>12.4f} {p:>12.4f}{mark}")
    total = sum(float(values[d.table["P"][i, j]]) for j in range(len(ex.tokens)))
    rows.append(f"  {'':>2}  {'sum':<12} {'':>12} {total:>12.4f}")
    return rows


def two_heads(ex: Example, causal: bool, say: Say, progress: Progress) -> Derivation:
    """The same sentence through a two-head layer: each head's weights for the query token, the output."""
    n, i = len(ex.tokens), ex.query
    if ex.W_Q.cols % 2 or ex.W_V.cols % 2:
        say("\n(two-head layer skipped: d_k and d_v must be even to split into two heads)")
        return None
    spec = MultiHeadSpec(n, ex.X.cols, 2, d_k=ex.W_Q.cols // 2, d_v=ex.W_V.cols // 2,
                         mask="causal" if causal else "none")
    say(f"\nTwo heads: {spec.title}")
    say(f"Head h uses columns {spec.d_k}h:{spec.d_k}(h+1) of W_Q, W_K, W_V; Z = Concat(head 0, head 1) W_O.")
    d = derive_multihead(spec, progress=progress)
    values = exact_values(d, {"X": ex.X, "Wq": ex.W_Q, "Wk": ex.W_K, "Wv": ex.W_V, "Wo": ex.W_O})
    heads = [d.table.children[str(h)] for h in range(spec.heads)]
    say(f"  {'j':>2}  {'token':<12}" + "".join(f" {'head ' + str(h) + ' p_ij':>14}" for h in range(spec.heads)))
    for j, token in enumerate(ex.tokens):
        cells = "".join(f" {float(values[t['P'][i, j]]):>14.4f}" for t in heads)
        say(f"  {j:>2}  {token:<12}{cells}")
    out = np.array([[float(values[d.table["Out"][r, m]]) for m in range(spec.d_model)] for r in range(n)])
    say(f"Layer output z for \"{ex.tokens[i]}\": [" + ", ".join(f"{x:.4f}" for x in out[i]) + "]")
    x, wq, wk, wv, wo = (np.array(M, dtype=float) for M in (ex.X, ex.W_Q, ex.W_K, ex.W_V, ex.W_O))
    numeric = multihead_attention(x, wq, wk, wv, wo, heads=2, is_causal=causal)
    say(f"Exact symbolic layer vs numeric layer (symattn.multihead_attention): max |difference| = "
        f"{np.max(np.abs(out - numeric)):.1e}")
    passed = sum(p.passed for p in d.proofs)
    say(f"{passed} of {len(d.proofs)} layer proofs passed (every weight and input gradient = plain "
        f"differentiation of the whole layer)." + ("" if d.proved else " SOME PROOFS FAILED."))
    return d


def heatmap(result: RunResult, path: str) -> None:
    """Save the attention weights (queries x keys) as a picture (PNG, PDF, SVG or JPEG by the suffix).
    Tokens are shown as plain text: matplotlib's math parser never sees them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tokens = result.example.tokens
    fig, ax = plt.subplots(figsize=(1.1 * len(tokens) + 2, 1.0 * len(tokens) + 1.5))
    image = ax.imshow(result.P, cmap="viridis", vmin=0.0)
    ax.set_xticks(range(len(tokens)), tokens, rotation=45, ha="right")
    ax.set_yticks(range(len(tokens)), tokens)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    for (r, c), p in np.ndenumerate(result.P):
        ax.text(c, r, f"{p:.2f}", ha="center", va="center", color="white" if p < 0.6 * result.P.max() else "black")
    ax.set_title(result.derivation.spec.title.replace(" (", "\n("), fontsize=9)
    fig.colorbar(image, ax=ax, label="weight p_ij")
    for text in (*ax.get_xticklabels(), *ax.get_yticklabels(), ax.title):
        text.set_parse_math(False)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def check_sentence(sentence: str | None) -> None:
    """Text from the command line that was not valid UTF-8 arrives with lone surrogates: refuse it by name."""
    if sentence is not None:
        try:
            sentence.encode("utf-8")
        except UnicodeEncodeError:
            raise SymattnError("the sentence is not valid UTF-8 text: give words in UTF-8") from None


def run(sentence: str | None = None, *, query: str | None = None, causal: bool = False, d_model: int = 4,
        d_k: int = 4, d_v: int | None = None, say: Say = print, progress: Progress = silent,
        plot: str | None = None) -> RunResult:
    """Derive and prove attention for `sentence`, print the forward steps of the query token in LaTeX,
    its attention weights as a table, and the proofs. Returns the numbers for further use."""
    d_model, d_k = _positive_int("d_model", d_model, "run"), _positive_int("d_k", d_k, "run")
    d_v = d_k if d_v is None else _positive_int("d_v", d_v, "run")
    check_sentence(sentence)
    check_sentence(query)
    limits.check_run_sizes(len((sentence or "").split()), d_model, d_k, d_v)
    ex = example(sentence, query=query, d_model=d_model, d_k=d_k, d_v=d_v)
    n = len(ex.tokens)
    spec = AttentionSpec(n, n, ex.W_Q.cols, ex.W_V.cols, mask="causal" if causal else "none")
    i = ex.query
    say(f"symattn run: \"{' '.join(ex.tokens)}\" ({n} tokens), d_model = {ex.X.cols}, "
        f"d_k = {spec.d_k}, d_v = {spec.d_v}, {'causal mask' if causal else 'no mask'}")
    say(f"Q = X W_Q, K = X W_K, V = X W_V from exact embeddings X ({n} x {ex.X.cols}).\n")
    d = derive(spec, progress=progress)
    progress("evaluating the exact forward values")
    values = exact_values(d, {"Q": ex.Q, "K": ex.K, "V": ex.V})
    shown = {sym: sympy.Float(v.evalf(12), 4) for sym, v in values.items()}
    say(f"Forward steps for the query token \"{ex.tokens[i]}\" (i = {i}), LaTeX:\n")
    for number, step in enumerate(d.forward(), 1):
        say(f"% {number}. {step.title}: {step.explanation}")
        for parts in step_latex(d, step, query=i, values=shown):
            say("  " + " = ".join(parts))
        say("")
    P = np.array([[float(values[d.table["P"][r, c]]) for c in range(n)] for r in range(n)])
    Q, K = (np.array(M, dtype=float) for M in (ex.Q, ex.K))
    result = RunResult(ex, d, P, reference.weights(Q, K, is_causal=causal, scale=spec.scale_value))
    say(f"Attention weights of \"{ex.tokens[i]}\" (row {i} of P):")
    for row in _weights_table(ex, d, values):
        say(row)
    say(f"\nExact symbolic weights vs NumPy reference: max |difference| = {result.agreement:.1e}")
    passed = sum(p.passed for p in d.proofs)
    say(f"\nProofs at n_q = n_k = {n}, d_k = {spec.d_k}, d_v = {spec.d_v}:")
    for line in proof_lines(d):
        say(line)
    say(f"{passed} of {len(d.proofs)} proofs passed." + ("" if d.proved else " SOME PROOFS FAILED."))
    if plot:
        heatmap(result, plot)
        say(f"Heatmap of all attention weights written to {plot}")
    result = dataclasses.replace(result, layer=two_heads(ex, causal, say, progress))
    progress("generating and verifying the kernels of this spec")
    report = verify(spec, progress=progress)
    say(f"\nGenerated kernels of {spec.name} checked four ways (symbolic, unrolled, loop, NumPy) "
        f"and against finite differences:")
    say(str(report))
    return dataclasses.replace(result, report=report)
