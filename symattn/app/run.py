"""The main job: derive, prove and explain attention on a small sentence (`symattn run`), with the plain
dot-product score or a variant (score, score mod, mask) whose parameters θ are exact example values."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import sympy

from ..errors import SizeTooLargeError, SpecError, SymattnError

from .. import limits
from ..numeric import reference
from ..symbolic.tensors import shape_of
from ..symbolic.derive import Derivation, derive, parameters
from .example import Example, default_sentence, example, parameters as example_parameters
from ..render.latex import step_latex
from ..render.notation import explanation_text
from .docs import Document, Literal, Prose, heatmap
from .inputs import input_matrices, inputs_example, read_inputs
from ..progress import Progress, silent
from ..symbolic.layer import derive_multihead
from ..numeric.layer import multihead_attention
from ..symbolic.fields import positive_int
from ..symbolic.spec import UNSCALED, AttentionSpec, MultiHeadSpec
from ..symbolic.modsteps import mod_theta
from ..symbolic.tensors import HEAD, TENSORS
from ..check.verification import layer_options, verify

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
    document: Document | None = None  # the worked example as printed: render(fmt) for text, LaTeX, Markdown, .tex
    head_P: tuple = ()  # (n, n) weights of each head of the two-head layer
    layer_params: dict = field(default_factory=dict)  # θ of the layer's heads (their shapes: d_k is half)
    layer_agreement: float | None = None  # max |exact − numeric| of the layer's output (None: no layer)

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


def _weights_table(ex: Example, d: Derivation, values: dict) -> tuple:
    """The table block of the query token's scores and weights (text lines as the terminal shows them)."""
    i, rows, text = ex.query, [], [f"  {'j':>2}  {'token':<12} {'score s_ij':>12} {'weight p_ij':>12}"]
    for j, token in enumerate(ex.tokens):
        s = float(values[d.table["S"][i, j]])
        p = float(values[d.table["P"][i, j]])
        mark = "masked" if not d.spec.visible(i, j) else ""
        rows.append([str(j), token, f"{s:.4f}", f"{p:.4f}", mark])
        text.append(f"  {j:>2}  {token:<12} {s:>12.4f} {p:>12.4f}" + (f"  ({mark})" if mark else ""))
    total = sum(float(values[d.table["P"][i, j]]) for j in range(len(ex.tokens)))
    rows.append(["", "sum", "", f"{total:.4f}", ""])
    text.append(f"  {'':>2}  {'sum':<12} {'':>12} {total:>12.4f}")
    return "table", ["$j$", "token", "score $s_{ij}$", "weight $p_{ij}$", ""], rows, text, "rlrrl"


def _proofs_table(d: Derivation) -> tuple:
    """The proofs as a table block (no timings: documents are deterministic)."""
    rows = [[p.step, Prose(p.claim), p.method, "passed" if p.passed else "FAILED"] for p in d.proofs]
    text = [f"  [{'pass' if p.passed else 'FAIL'}] {p.kind:<9}{p.step:<16} {p.method:<24} {explanation_text(p.claim)}"
            + (f"\n         {p.failure}" if p.failure else "") for p in d.proofs]
    return "table", ["step", "claim", "method", "result"], rows, text, r"p{0.14\linewidth}p{0.5\linewidth}p{0.2\linewidth}l"


def _layer_refusal(ex: Example) -> str | None:
    """Why the example cannot go through the two-head layer (whatever the variant), or None."""
    if ex.X is None:
        return "the inputs give Q, K, V, not embeddings and projections"
    if ex.W_O is None:
        return "the inputs file gives no output projection $W_O$"
    if ex.W_Q.cols % 2 or ex.W_V.cols % 2:
        return "$d_k$ and $d_v$ must be even to split into two heads"
    return None


def layer_spec(ex: Example, head: AttentionSpec) -> MultiHeadSpec | str:
    """The two-head layer of the example computing the single head's variant (score, score mod, mask), or why
    there is none (the example's shape, or a variant the layer refuses, e.g. alibi:heads=4 on two heads)."""
    refusal = _layer_refusal(ex)
    if refusal:
        return refusal
    try:
        spec = MultiHeadSpec(len(ex.tokens), ex.X.cols, 2, d_k=ex.W_Q.cols // 2, d_v=ex.W_V.cols // 2,
                             scale=head.scale, mask=head.mask, score=head.score, hidden=head.hidden,
                             score_mod=head.score_mod)
        spec.check_explicit()
    except (SpecError, SizeTooLargeError) as e:
        return Literal(str(e))
    return spec


def _layer_theta(spec: MultiHeadSpec, params: dict[str, np.ndarray], doc: Document) -> dict[str, np.ndarray]:
    """θ of the layer's heads (shared by both): the example's values at the heads' shapes, the single head's
    where the shapes agree; shown where they differ (a head is d_k wide, half the single head)."""
    theta = _theta(spec.head)
    if any(theta[name].shape != params[name].shape for name in theta):
        doc.add("para", [f"Both heads share the variant's parameters $\\theta$; at the heads' width "
                         f"$d_k = {spec.d_k}$ their exact example values are:"])
        _show_theta(spec.head, theta, doc)
    elif theta:
        doc.add("para", ["Both heads share the variant's parameters $\\theta$, the values above."])
    return theta


def _layer_numeric(ex: Example, spec: MultiHeadSpec, theta: dict[str, np.ndarray]) -> np.ndarray:
    """Z (n, d_model) of symattn.multihead_attention with the variant: θ as floats, the mask as the causal flag
    or the index predicate (a run-time mask's data with it)."""
    x, wq, wk, wv, wo = (np.array(M, dtype=float) for M in (ex.X, ex.W_Q, ex.W_K, ex.W_V, ex.W_O))
    return multihead_attention(x, wq, wk, wv, wo, params={k: v.astype(float) for k, v in theta.items()},
                               **layer_options(spec))


def _layer_variant(spec: MultiHeadSpec) -> str:
    """The end of the layer's first sentence: the variant every head computes ('.' for plain attention)."""
    if spec.score == "dot" and spec.mod_object is None and spec.mask == "none":
        return "."
    mod, s, (q, kv) = spec.mod_object, sympy.Symbol("s", real=True), sympy.symbols("q kv", integer=True)
    uses_h = mod is not None and HEAD in sympy.sympify(mod.formula(s, 0, HEAD, q, kv,
                                                                   mod_theta(spec.head))).free_symbols
    return (f"; each head computes the single head's variant: {_describe(spec.head)}"
            + (", the score mod's $h$ being the head's index (0 or 1)." if uses_h else "."))


def _heads_table(ex: Example, spec: MultiHeadSpec, head_P: tuple) -> tuple:
    """The table block of each head's weights for the query token, masked keys marked."""
    i, heads = ex.query, range(spec.heads)
    marks = ["" if spec.visible(i, j) else "masked" for j in range(len(ex.tokens))]
    text = [f"  {'j':>2}  {'token':<12}" + "".join(f" {'head ' + str(h) + ' p_ij':>14}" for h in heads)]
    text += [f"  {j:>2}  {token:<12}" + "".join(f" {P[i, j]:>14.4f}" for P in head_P)
             + (f"  ({marks[j]})" if marks[j] else "") for j, token in enumerate(ex.tokens)]
    rows = [[str(j), t, *(f"{P[i, j]:.4f}" for P in head_P), marks[j]] for j, t in enumerate(ex.tokens)]
    header = ["$j$", "token", *(f"head {h} $p_{{ij}}$" for h in heads), ""]
    return "table", header, rows, text, "rl" + "r" * len(heads) + "l"


def two_heads(ex: Example, head: AttentionSpec, params: dict[str, np.ndarray], doc: Document, progress: Progress):
    """The same sentence through a two-head layer of the same variant: each head's weights for the query token,
    the output, checked against the numeric layer. Returns the layer's Derivation, each head's (n, n) weights,
    θ (exact, at the heads' shapes) and max |exact − numeric| of the output, or (None, (), {}, None)."""
    n, i = len(ex.tokens), ex.query
    spec = layer_spec(ex, head)
    if not isinstance(spec, MultiHeadSpec):
        doc.add("para", ["\n(two-head layer skipped: ", spec, ")"])
        return None, (), {}, None
    doc.add("heading", "Two heads: a multi-head self-attention layer")
    doc.add("para", [f"The sentence through a layer of $h = {spec.heads}$ heads on $d_{{\\text{{model}}}} = "
                     f"{spec.d_model}$, each with $d_k = {spec.d_k}$ and $d_v = {spec.d_v}$" + _layer_variant(spec)])
    columns = "; ".join(f"head {h}: " + (f"columns {spec.d_k * h} to {spec.d_k * (h + 1) - 1}" if spec.d_k > 1
                                          else f"column {h}") for h in range(2))
    doc.add("para", [f"Each head takes its own columns of $W_Q$, $W_K$, $W_V$ ({columns}); the layer's output is"])
    doc.add("para", [r"$Z = \operatorname{Concat}(\mathrm{head}_0, \mathrm{head}_1) W_O$."])
    doc.add("matrix", "W_O", f"the output projection ({ex.W_O.rows} × {ex.W_O.cols})", ex.W_O, None)
    theta = _layer_theta(spec, params, doc)
    d = derive_multihead(spec, progress=progress)
    shared = {p.tensor: theta[p.name] for p in parameters(spec.head)}
    values = exact_values(d, {"X": ex.X, "Wq": ex.W_Q, "Wk": ex.W_K, "Wv": ex.W_V, "Wo": ex.W_O, **shared})
    heads = [d.table.children[str(h)] for h in range(spec.heads)]
    head_P = tuple(np.array([[float(values[t["P"][r, c]]) for c in range(n)] for r in range(n)]) for t in heads)
    doc.add(*_heads_table(ex, spec, head_P))
    out = np.array([[float(values[d.table["Out"][r, m]]) for m in range(spec.d_model)] for r in range(n)])
    doc.add("para", ["Layer output $z$ for \"", Literal(ex.tokens[i]), "\": [" + ", ".join(f"{x:.4f}" for x in out[i])
                     + "]"])
    agreement = float(np.max(np.abs(out - _layer_numeric(ex, spec, theta))))
    doc.add("para", [f"Exact symbolic layer vs numeric layer (symattn.multihead_attention): max $|\\text{{difference}}|$ = "
                     f"{agreement:.1e}"])
    passed = sum(p.passed for p in d.proofs)
    doc.add("para", [f"{passed} of {len(d.proofs)} layer proofs passed (every weight and input gradient = plain "
                     f"differentiation of the whole layer)." + ("" if d.proved else " SOME PROOFS FAILED.")])
    return d, head_P, theta, agreement


def check_sentence(sentence: str | None, what: str = "the sentence") -> None:
    """Text from the command line that was not valid UTF-8 arrives with lone surrogates, and a control character
    (ESC, BEL) would reach the terminal raw and stop pdflatex: refuse either by name, as an inputs file's
    tokens are."""
    if sentence is not None:
        try:
            sentence.encode("utf-8")
        except UnicodeEncodeError:
            raise SymattnError(f"{what} is not valid UTF-8 text: give words in UTF-8") from None
        for k, token in enumerate(sentence.split()):
            bad = next((c for c in token if not c.isprintable()), None)
            if bad is not None:
                raise SymattnError(f"{what}: token {k} holds the control character U+{ord(bad):04X}; give "
                                   f"printable words")


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
    """The variant in words, with $math$ (a user mod's or mask's name never opens math): 'no mask' for plain
    attention; the score, score mod and mask otherwise."""
    words = [f"{spec.score} score" + (f" ($d_a = {spec.hidden}$)" if spec.hidden else "")] if spec.score != "dot" else []
    words += [f"score mod {spec.score_mod.replace('$', '')}"] if spec.mod_object is not None else []
    return ", ".join(words + [{"none": "no mask", "causal": "causal mask"}.get(spec.mask, f"mask {spec.mask}")
                              .replace("$", "")])


def _theta(spec: AttentionSpec) -> dict[str, np.ndarray]:
    """Exact example values of the variant's parameters θ at the spec's shapes, keyed by parameter name."""
    return example_parameters({p.name: TENSORS[p.tensor].shape(spec) for p in parameters(spec)})


def _show_theta(spec: AttentionSpec, params: dict[str, np.ndarray], doc: Document) -> None:
    """θ as matrices (a vector as one row) with their params key."""
    for p in parameters(spec):
        x = params[p.name]
        doc.add("matrix", TENSORS[p.tensor].latex, f"params[{p.name!r}], shape {x.shape}",
                sympy.ImmutableMatrix(x.reshape(x.shape[0] if x.ndim == 2 else 1, -1)), None)


def _parameters(spec: AttentionSpec, doc: Document) -> dict[str, np.ndarray]:
    """Exact example values of the variant's parameters θ, keyed by parameter name (none for the dot product),
    shown as matrices (a vector as one row)."""
    params = _theta(spec)
    if params:
        doc.add("para", ["The variant's parameters, exact deterministic example values:"])
    _show_theta(spec, params, doc)
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


def _example(sentence, inputs, query, d_model, d_k, d_v, variant: dict) -> Example:
    """The worked example from the sentence options or an inputs file/mapping, every size checked against the
    limits of the `variant` (score, hidden, score_mod: limits.check_run_sizes) before any SymPy work."""
    check_sentence(sentence)
    check_sentence(query, "the query")
    if query is not None and not query.strip():
        raise SymattnError("the query is empty: give one token of the sentence (or leave --query out for the first)")
    if inputs is not None:
        if sentence is not None or any(x is not None for x in (d_model, d_k, d_v)):
            raise SymattnError("the inputs file gives the tokens and sizes: leave out the sentence, d_model, d_k "
                               "and d_v")
        if isinstance(inputs, Mapping):
            return inputs_example(inputs, query=query, variant=variant)
        return read_inputs(inputs, query=query, variant=variant)
    tokens = len((default_sentence() if sentence is None else sentence).split())  # the default's 6 count too
    width = limits.run_width(tokens, **variant)  # default widths: 4, or narrower where the variant's limit says
    d_model = positive_int("d_model", width if d_model is None else d_model, "run")
    d_k = positive_int("d_k", width if d_k is None else d_k, "run")
    d_v = d_k if d_v is None else positive_int("d_v", d_v, "run")
    limits.check_run_sizes(tokens, d_model, d_k, d_v, **variant)
    return example(sentence, query=query, d_model=d_model, d_k=d_k, d_v=d_v)


def _inputs_section(ex: Example, doc: Document) -> None:
    """The inputs before step 1: X, the projections, Q, K, V as exact matrices, rows labelled by token."""
    doc.add("heading", "Inputs")
    made = ", and $Q = X W_Q$, $K = X W_K$, $V = X W_V$ from them" if ex.X is not None else ""
    doc.add("para", [f"Exact numbers from {ex.source}{made}:"])
    for name, what, M, labels in input_matrices(ex):
        doc.add("matrix", name, what, M, labels)


def run(sentence: str | None = None, *, inputs=None, query: str | None = None, causal: bool = False,
        mask: str | None = None, score: str = "dot", hidden: int | None = None, score_mod: str | None = None,
        d_model: int | None = None, d_k: int | None = None, d_v: int | None = None, say: Say = print,
        progress: Progress = silent, plot: str | None = None, kernels: bool = True) -> RunResult:
    """Derive and prove attention for `sentence` (default "The cat sat on the mat", d_model = d_k = d_v = 4, or
    narrower where the score's size limits say: limits.run_width) or
    your own numbers, print the inputs, the forward steps of the query token in LaTeX with their numbers, its
    attention weights as a table, the proofs, a two-head layer and (`kernels`) the generated kernels' verification.
    Returns the numbers and the document (result.document.render("text"|"latex"|"markdown"|"tex")).

    inputs: a path to a JSON or .npz inputs file, or a mapping in the same schema (symattn.app.inputs):
    {"tokens": [...], "X": [[...]], "W_Q": ..., "W_K": ..., "W_V": ... [, "W_O": ...]} or {"tokens": [...],
    "Q": [[...]], "K": ..., "V": ...}; entries exact (integers, decimals, "p/q"). A bad file raises InputError
    naming the field, before any derivation.
    The variant: `score` ("dot", "general", "additive" with `hidden` units), `score_mod` (e.g. "alibi",
    "softcap:30", "relative-bias:2") and `mask` (e.g. "causal", "window:2", "prefix:1"; `causal` = "causal")."""
    ex = _example(sentence, inputs, query, d_model, d_k, d_v,
                  dict(score=score, hidden=hidden, score_mod=score_mod))
    n, i = len(ex.tokens), ex.query
    spec = variant_spec(n, ex.Q.cols, ex.V.cols, causal=causal, mask=mask, score=score, hidden=hidden,
                        score_mod=score_mod)
    doc = Document(say)
    width = f"$d_{{\\text{{model}}}} = {ex.X.cols}$, " if ex.X is not None else ""
    sizes = f"{width}$d_k = {spec.d_k}$, $d_v = {spec.d_v}$, {_describe(spec)}"  # prose with $math$
    doc.add("title", f"symattn run: \"{' '.join(ex.tokens)}\" ({n} tokens), {explanation_text(sizes)}",
            f"Worked example: \"{' '.join(ex.tokens)}\"")
    doc.blocks.append(("para", [f"Attention on {n} tokens: {sizes}."]))  # not said on the terminal
    params = _parameters(spec, doc)
    _inputs_section(ex, doc)
    d = derive(spec, progress=progress)
    progress("evaluating the exact forward values")
    theta = {p.tensor: params[p.name] for p in parameters(spec)}
    values = exact_values(d, {"Q": ex.Q, "K": ex.K, "V": ex.V, **theta})
    shown = {sym: sympy.Float(v.evalf(12), 4) for sym, v in values.items()}
    doc.add("heading", "Forward steps")
    doc.add("para", ["Forward steps for the query token \"", Literal(ex.tokens[i]), f"\" ($i = {i}$):\n"])
    for number, step in enumerate(d.forward(), 1):
        doc.add("step", number, step.title, step.explanation, step_latex(d, step, query=i, values=shown))
    P = np.array([[float(values[d.table["P"][r, c]]) for c in range(n)] for r in range(n)])
    result = RunResult(ex, d, P, _reference_weights(spec, ex, params), params=params, document=doc)
    doc.add("para", ["Attention weights of \"", Literal(ex.tokens[i]), f"\" (row {i} of $P$):"])
    doc.add(*_weights_table(ex, d, values))
    doc.add("para", [f"\nExact symbolic weights vs NumPy reference: max $|\\text{{difference}}|$ = {result.agreement:.1e}"])
    doc.add("heading", "Proofs")
    doc.add("para", [f"At $n_q = n_k = {n}$, $d_k = {spec.d_k}$, $d_v = {spec.d_v}$:"])
    doc.add(*_proofs_table(d))
    passed = sum(p.passed for p in d.proofs)
    doc.add("para", [f"{passed} of {len(d.proofs)} proofs passed." + ("" if d.proved else " SOME PROOFS FAILED.")])
    layer, head_P, layer_params, layer_agreement = two_heads(ex, spec, params, doc, progress)
    result = dataclasses.replace(result, layer=layer, head_P=head_P, layer_params=layer_params,
                                 layer_agreement=layer_agreement)
    if plot:
        heatmap(result, plot)
        say(f"Heatmap of all attention weights written to {plot}")
    if not kernels:
        return result
    progress("generating and verifying the kernels of this spec")
    report = verify(spec, progress=progress)
    doc.add("heading", f"Generated kernels of {spec.name} checked {_ways(report)} and against finite differences:",
            f"Generated kernels, checked {_ways(report)} and against finite differences")
    doc.add("pre", str(report).splitlines())
    return dataclasses.replace(result, report=report)
