"""The main job: derive, prove and explain attention on a small sentence (`symattn run`), with the plain
dot-product score or a variant (score, score mod, mask) whose parameters θ are exact example values."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import sympy

from ..errors import SymattnError

from .. import limits
from ..numeric import reference
from ..symbolic.tensors import shape_of
from ..symbolic.derive import Derivation, derive, parameters
from .example import Example, example, parameters as example_parameters
from ..render.latex import proof_lines, step_latex
from ..outputs import save_figure
from ..progress import Progress, silent
from ..symbolic.layer import derive_multihead
from ..numeric.layer import multihead_attention
from ..symbolic.spec import UNSCALED, AttentionSpec, MultiHeadSpec, _positive_int
from ..symbolic.tensors import TENSORS
from ..check.verification import verify

Say = Callable[[str], None]
NUMBERS = {2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class RunResult:
    example: Example
    derivation: Derivation
    P: np.ndarray  # (n, n) weights evaluated from the exact symbolic values
    P_reference: np.ndarray  # (n, n) NumPy reference
    report: object = None  # verification.VerifyReport of the generated kernels
    layer: Derivation | None = None  # the two-head layer, with its proofs
    params: dict = field(default_factory=dict)  # parameter name -> exact values (object array) of θ

    @property
    def passed(self) -> bool:
        return (self.derivation.proved and (self.report is None or self.report.passed)
                and (self.layer is None or self.layer.proved))

    @property
    def agreement(self) -> float:
        return float(np.max(np.abs(self.P - self.P_reference)))


def exact_values(d: Derivation, inputs: dict) -> dict[sympy.Symbol, sympy.Expr]:
    """Exact value of every forward element symbol, from exact inputs (matrices or object arrays of any rank)
    keyed by tensor name."""
    t = d.table
    values = {}
    for name, M in inputs.items():
        values.update({t[name][ix]: M[ix] for ix in np.ndindex(*M.shape)})
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


def _layer_refusal(ex: Example, head: AttentionSpec) -> str | None:
    """Why the two-head layer is not shown for this example and variant, or None."""
    if ex.W_Q.cols % 2 or ex.W_V.cols % 2:
        return "d_k and d_v must be even to split into two heads"
    if head.score != "dot" or head.mod_object is not None:
        return "the multi-head layer has the plain dot-product score only, without score mods"
    if head.mask not in ("none", "causal"):
        return f"the multi-head layer takes no mask or the causal mask only, not {head.mask}"
    return None


def two_heads(ex: Example, head: AttentionSpec, say: Say, progress: Progress) -> Derivation | None:
    """The same sentence through a two-head layer: each head's weights for the query token, the output."""
    n, i, causal = len(ex.tokens), ex.query, head.causal
    refusal = _layer_refusal(ex, head)
    if refusal:
        say(f"\n(two-head layer skipped: {refusal})")
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


def variant_spec(n: int, d_k: int, d_v: int, *, causal: bool = False, mask: str | None = None,
                 score: str = "dot", hidden: int | None = None, score_mod: str | None = None) -> AttentionSpec:
    """The single-head spec of the worked example (n tokens attend to each other) with the variant; refuses a
    bad variant, or one too large to expand exactly, before any work."""
    if causal and mask not in (None, "causal"):
        raise SymattnError(f"causal and mask {mask!r} disagree: give one of them")
    spec = AttentionSpec(n, n, d_k, d_v, mask="causal" if causal else (mask or "none"), score=score,
                         hidden=hidden, score_mod=score_mod or "none")
    spec.check_explicit()
    return spec


def _describe(spec: AttentionSpec) -> str:
    """The variant in words: 'no mask' for plain attention; the score, score mod and mask otherwise."""
    words = [f"{spec.score} score" + (f" (d_a = {spec.hidden})" if spec.hidden else "")] if spec.score != "dot" else []
    words += [f"score mod {spec.score_mod}"] if spec.mod_object is not None else []
    return ", ".join(words + [{"none": "no mask", "causal": "causal mask"}.get(spec.mask, f"mask {spec.mask}")])


def _parameters(spec: AttentionSpec, say: Say) -> dict[str, np.ndarray]:
    """Exact example values of the variant's parameters θ, keyed by parameter name (none for the dot product)."""
    params = example_parameters({p.name: TENSORS[p.tensor].shape(spec) for p in parameters(spec)})
    if params:
        say("Parameters of the variant, exact deterministic example values:")
    for name, x in params.items():
        say(f"  {name} {x.shape} = {x.tolist()}")
    return params


def _reference_weights(spec: AttentionSpec, ex: Example, params: dict[str, np.ndarray]) -> np.ndarray:
    """P (n, n) of the NumPy reference for the example's Q, K and the variant."""
    Q, K = (np.array(M, dtype=float) for M in (ex.Q, ex.K))
    return reference.weights(Q, K, is_causal=spec.causal, mask=None if spec.causal else spec.mask_array(),
                             scale=None if spec.score in UNSCALED else spec.scale_value, score=spec.score,
                             params={name: x.astype(float) for name, x in params.items()},
                             score_mod=spec.mod_object)


def _ways(report) -> str:
    """The paths a verification compared, in words: 'four ways (symbolic, unrolled, loop, NumPy)'."""
    kinds = ["symbolic", *dict.fromkeys(c.path.split()[0] for c in report.comparisons)]
    return f"{NUMBERS.get(len(kinds), len(kinds))} ways ({', '.join(kinds)})"


def run(sentence: str | None = None, *, query: str | None = None, causal: bool = False, mask: str | None = None,
        score: str = "dot", hidden: int | None = None, score_mod: str | None = None, d_model: int = 4,
        d_k: int = 4, d_v: int | None = None, say: Say = print, progress: Progress = silent,
        plot: str | None = None) -> RunResult:
    """Derive and prove attention for `sentence`, print the forward steps of the query token in LaTeX,
    its attention weights as a table, and the proofs. Returns the numbers for further use.
    The variant: `score` ("dot", "general", "additive" with `hidden` units), `score_mod` (e.g. "alibi",
    "softcap:30", "relative-bias:2") and `mask` (e.g. "causal", "window:2", "prefix:1"; `causal` = "causal")."""
    d_model, d_k = _positive_int("d_model", d_model, "run"), _positive_int("d_k", d_k, "run")
    d_v = d_k if d_v is None else _positive_int("d_v", d_v, "run")
    check_sentence(sentence)
    check_sentence(query)
    limits.check_run_sizes(len((sentence or "").split()), d_model, d_k, d_v)
    ex = example(sentence, query=query, d_model=d_model, d_k=d_k, d_v=d_v)
    n = len(ex.tokens)
    spec = variant_spec(n, ex.W_Q.cols, ex.W_V.cols, causal=causal, mask=mask, score=score, hidden=hidden,
                        score_mod=score_mod)
    i = ex.query
    say(f"symattn run: \"{' '.join(ex.tokens)}\" ({n} tokens), d_model = {ex.X.cols}, "
        f"d_k = {spec.d_k}, d_v = {spec.d_v}, {_describe(spec)}")
    params = _parameters(spec, say)
    say(f"Q = X W_Q, K = X W_K, V = X W_V from exact embeddings X ({n} x {ex.X.cols}).\n")
    d = derive(spec, progress=progress)
    progress("evaluating the exact forward values")
    theta = {p.tensor: params[p.name] for p in parameters(spec)}
    values = exact_values(d, {"Q": ex.Q, "K": ex.K, "V": ex.V, **theta})
    shown = {sym: sympy.Float(v.evalf(12), 4) for sym, v in values.items()}
    say(f"Forward steps for the query token \"{ex.tokens[i]}\" (i = {i}), LaTeX:\n")
    for number, step in enumerate(d.forward(), 1):
        say(f"% {number}. {step.title}: {step.explanation}")
        for parts in step_latex(d, step, query=i, values=shown):
            say("  " + " = ".join(parts))
        say("")
    P = np.array([[float(values[d.table["P"][r, c]]) for c in range(n)] for r in range(n)])
    result = RunResult(ex, d, P, _reference_weights(spec, ex, params), params=params)
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
    result = dataclasses.replace(result, layer=two_heads(ex, spec, say, progress))
    progress("generating and verifying the kernels of this spec")
    report = verify(spec, progress=progress)
    say(f"\nGenerated kernels of {spec.name} checked {_ways(report)} and against finite differences:")
    say(str(report))
    return dataclasses.replace(result, report=report)
