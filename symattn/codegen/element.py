"""Generic element kernels (any score, score mod and index mask, any size), printed from the indexed derivation.

The score s̄_ij (the derivation's similarity times the scale, or its unscaled score) is split by loop-invariant
hoisting: every maximal sub-expression holding a sum that depends on the query side only (i) or the key side only
(j) becomes an array computed once per row or key (additive: Σ_a Q[i,a] W_a[a,r] -> hq[i, r]; cosine's norms ->
hq[i], hk[j]); what remains, g, is evaluated per pair. The backward differentiates g by SymPy (`partial`, the
derivation's own rule) w.r.t. each array it reads, accumulating dL/d(hoisted) per pair, then chains each hoisted
array back to Q, K and θ in one pass. Sums are lowered to loops (loop-invariant sums first), each block CSE'd once
(lowering.py).
The template (jinja/element.py.j2) writes the loop structure: rows, keys, softmax, the masked-rows policy.
"""
from __future__ import annotations


import sympy

from ..filestamp import stamp
from ..symbolic.derive import derive
from ..symbolic.score import SCORES, contract, partial
from ..symbolic.spec import AttentionSpec
from ..symbolic.tensors import SIZES, TENSORS, i, j
from .loop import SCALE, _ENV, _summand
from .files import write_files
from .lowering import (Accumulation, Bilinear, Emitter, Hoisted, bilinear, emit_accumulations, fresh_dummies,
                       hoist, tidy)
from .printer import NumbaPrinter
from .templates import HEADER, decorator

#: FlexAttention's batch and head indices in mods and masks (the symbols masks.traced uses).
B_IDX, H_IDX = sympy.Symbol("b", integer=True), sympy.Symbol("h", integer=True)


class ElementPrinter(NumbaPrinter):
    """NumbaPrinter whose Indexed reads keep their indices: Q[i, a] -> Q[qz, i, a], W_a[a, r] -> p_Wa[a, r]."""

    _default_settings = {**NumbaPrinter._default_settings, "arrays": {}}

    def _print_Indexed(self, expr):
        name = expr.base.label.name
        if name not in self._settings["arrays"]:
            raise ValueError(f"no array for indexed tensor {name} in this kernel")
        code, row = self._settings["arrays"][name]
        return f"{code}[{', '.join(([row] if row else []) + [self._print(x) for x in expr.indices])}]"

    def _print_tanh(self, expr):
        return f"_tanh({self._print(expr.args[0])})"

    def _print_exp(self, expr):
        return f"_exp({self._print(expr.args[0])})"

    def _print_Pow(self, expr, rational=False):
        """An integer raised to a run-time power is computed in floating point (2**-h is not an integer)."""
        if expr.base.is_Integer and not expr.exp.is_number:
            return f"{float(expr.base)!r}**({self._print(expr.exp)})"
        return super()._print_Pow(expr, rational)

    def _print_KroneckerDelta(self, expr):
        return f"(1 if {self._print(expr.args[0])} == {self._print(expr.args[1])} else 0)"

    def _print_Min(self, expr):
        out = self._print(expr.args[0])
        for arg in expr.args[1:]:
            out = f"min({out}, {self._print(arg)})"
        return out


# -- the variant -------------------------------------------------------------------------------------------

def _spec(score: str, mod) -> AttentionSpec:
    return AttentionSpec(1, 1, 1, score=score, hidden=1 if score == "additive" else None,
                         score_mod="none" if mod is None else mod.text)


def _leaf_bases(expr: sympy.Expr) -> list[str]:
    return sorted({x.base.label.name for x in expr.atoms(sympy.Indexed)})


def _wrt(name: str, hoisted: dict[str, Hoisted]) -> tuple[sympy.Indexed, tuple]:
    """The element X[w] a gradient is taken by, and its free loop indices (symbol, dim)."""
    if name in ("Q", "K"):
        w = sympy.Symbol(f"x_{name}", integer=True, nonnegative=True)
        return TENSORS[name].base[(i if name == "Q" else j), w], ((w, "d_k"),)
    if name in hoisted:
        h = hoisted[name]
        w = tuple((sympy.Symbol(f"x_{name}{n}", integer=True, nonnegative=True), dim)
                  for n, (_, dim) in enumerate(h.outer))
        return h.base[(i if h.side == "q" else j,) + tuple(x for x, _ in w)], w
    dims = TENSORS[name].dims
    if all(dim == "one" for dim in dims):  # a scalar parameter (cosine's tau): its one entry, no loop
        return TENSORS[name].base[(0,) * len(dims)], ()
    w = tuple((sympy.Symbol(f"x_{name}{n}", integer=True, nonnegative=True), dim) for n, dim in enumerate(dims))
    return TENSORS[name].base[tuple(x for x, _ in w)], w


def _grad(name: str, index: tuple) -> sympy.Indexed:
    """Where dL/dX[w] accumulates: the array d<X> (dQ[z, ...], a hoisted array's dh, a θ's per-element partial)."""
    return sympy.IndexedBase(sympy.Symbol("d" + name))[index]


def _accumulations(expr: sympy.Expr, seed: sympy.Expr, hoisted: dict[str, Hoisted]) -> list[Accumulation]:
    """d<X>[w] += seed * ∂expr/∂X[w] for every array X that `expr` reads (SymPy's partial, deltas contracted)."""
    out = []
    for name in _leaf_bases(expr):
        element, loops = _wrt(name, hoisted)
        slope = partial(expr, element)
        out.append(Accumulation(_grad(name, element.indices), loops, tidy(seed * slope)))
    return out


def _local_name(target: sympy.Indexed) -> str:
    return "sum_" + "_".join([target.base.label.name] + [str(x) for x in target.indices if x != i])


def _local(a: Accumulation) -> Accumulation:
    """A scalar accumulation into X[i] (one per query row) or into a fixed entry (a scalar θ) goes to a local
    sum, added after the row's keys: no read-modify-write per pair."""
    if a.loops or not (tuple(a.target.indices) == (i,) or all(x.is_Integer for x in a.target.indices)):
        return a
    return Accumulation(sympy.Symbol(_local_name(a.target)), (), a.expr)


def _chain(h: Hoisted, hoisted: dict[str, Hoisted]) -> list[Accumulation]:
    """Σ_u dH[row, u] ∂H[row, u]/∂X[w] for every array X of a hoisted definition."""
    out = []
    own = h.element()
    dH = sympy.IndexedBase(sympy.Symbol("d" + h.name))[own.indices]
    for name in _leaf_bases(h.definition):
        element, loops = _wrt(name, hoisted)
        total = dH * partial(h.definition, element)
        if h.outer:
            total = contract(sympy.Sum(total, *((x, 0, SIZES[dim] - 1) for x, dim in h.outer)))
        out.append(Accumulation(_grad(name, element.indices), loops, tidy(total)))
    return out


# -- rendering -----------------------------------------------------------------------------------------------

def _bind_rows(expr, mask):
    """A run-time array's read name[b, k] -> name[mb_name, k]: the kernel binds b to 0 where the array has one row."""
    for name, _ in getattr(mask, "arrays", ()) or ():
        base = sympy.IndexedBase(sympy.Symbol(name))
        expr = expr.replace(lambda x: isinstance(x, sympy.Indexed) and x.base == base,
                            lambda x: base[(sympy.Symbol(f"mb_{name}"),) + tuple(x.indices[1:])])
    return expr


def _mask_condition(mask) -> sympy.Expr:
    """The mask's predicate on (b, h, i, j) (True for no mask, or where the mask's span is exact)."""
    if mask is None or getattr(mask, "exact", False):
        return sympy.true
    return _bind_rows(sympy.sympify(mask.condition(i, j)), mask)


def _mask_span(mask) -> tuple[sympy.Expr, sympy.Expr]:
    """The keys [lo, hi) query i can see at most (the mask's span; all keys without one), clipped to [0, n_k)."""
    n_k = SIZES["n_k"]
    span = getattr(mask, "span", None) if mask is not None else None
    if span is None:
        return sympy.S.Zero, n_k
    lo, hi = span(B_IDX, i)
    lo = sympy.S.Zero if lo is None else sympy.Max(_bind_rows(sympy.sympify(lo), mask), 0)
    hi = n_k if hi is None else sympy.Min(_bind_rows(sympy.sympify(hi), mask), n_k)
    return lo, hi


def _mod_pieces(mod, sr: sympy.Symbol) -> tuple[sympy.Expr, sympy.Expr, list]:
    """s = f(s̄, b, h, i, j; θ), ∂f/∂s̄ (by SymPy, as the derivation's dSr step) and the θ scatters
    [(θ element read, ∂f/∂(that element))]."""
    if mod is None:
        return sr, sympy.S.One, []
    theta = {p.name: (lambda *ix, t=p.tensor: TENSORS[t].base[ix]) for p in mod.params}
    f = mod.formula(sr, B_IDX, H_IDX, i, j, theta)
    sigma = sympy.Symbol("sigma", real=True)
    slope = sympy.diff(f.xreplace({sr: sigma}), sigma).xreplace({sigma: sr})
    tensors = {p.tensor for p in mod.params}
    reads = sorted((x for x in f.atoms(sympy.Indexed) if x.base.label.name in tensors), key=sympy.default_sort_key)
    scatters = []
    for x in reads:
        stand_in = sympy.Symbol("theta_read", real=True)
        scatters.append((x, sympy.diff(f.xreplace({x: stand_in}), stand_in).xreplace({stand_in: x})))
    return f, slope, scatters


def _params(spec: AttentionSpec) -> list[tuple[str, str, tuple]]:
    """(API name, tensor name, dims) of every θ: the score's, then the mod's."""
    out = list((p.name, p.tensor, p.dims) for p in SCORES[spec.score].params)
    if spec.mod_object is not None:
        out += [(p.name, p.tensor, p.dims) for p in spec.mod_object.params]
    return out


def _arrays(params, hoisted, mask_arrays) -> dict[str, tuple[str, str | None]]:
    """Indexed base name -> (kernel array, batch-row local or None)."""
    arrays = {"Q": ("Q", "qz"), "K": ("K", "kz"), "V": ("V", "vz"), "dQ": ("dQ", "z"), "dK": ("dK", "z")}
    for _, tensor, _ in params:
        arrays[tensor] = (f"p_{tensor}", None)
        arrays["d" + tensor] = (f"g_{tensor}", "z")
    for h in hoisted:
        arrays[h.name] = (h.name, None)
        arrays["d" + h.name] = ("d" + h.name, None)
    for name in mask_arrays:
        arrays[name] = (f"m_{name}", None)
    return arrays


def _sizes(params) -> list[tuple[str, str]]:
    """(size name, code) of the sizes the kernel reads off its arrays."""
    sizes = [("n_q", "Q.shape[1]"), ("n_k", "K.shape[1]"), ("d_k", "Q.shape[2]"), ("d_v", "V.shape[2]"), ("one", "1")]
    known = {name for name, _ in sizes}
    for _, tensor, dims in params:
        for n, dim in enumerate(dims):
            if dim not in known:
                sizes.append((dim, f"p_{tensor}.shape[{n}]"))
                known.add(dim)
    return sizes


class _Blocks:
    """The printed blocks of one variant: hoisted arrays, the score per pair, its gradients, the chain."""

    def __init__(self, g, hoisted: list[Hoisted], products: list[Bilinear], mod, printer: ElementPrinter):
        self.g, self.hoisted, self.products, self.printer = g, hoisted, products, printer
        self.by_name = {h.name: h for h in hoisted}
        self.f, self.slope, self.scatters = _mod_pieces(mod, sympy.Symbol("sr"))
        self.seeds = _accumulations(g, sympy.Symbol("dsr"), self.by_name)  # per pair, seeded by dS̄
        self.row_sums = [a.target for a in self.seeds if _local(a).target != a.target]

    def run(self, *emits) -> list[str]:
        """Each emit on one emitter (later blocks reuse the sums of earlier ones), its lines as one string."""
        e, out = Emitter(self.printer), []
        for emit in emits:
            emit(e)
            out.append("\n".join(e.lines))
            e.lines.clear()
        return out

    def hoisted_block(self, h: Hoisted, e: Emitter) -> None:
        for n, (x, dim) in enumerate(h.outer):
            e.line(n, f"for {x} in range({dim}):")
        value, = e.values([h.definition], len(h.outer))
        e.line(len(h.outer), f"{self.printer.doprint(h.element())} = {value}")

    def pair(self, e: Emitter) -> None:
        """sr = s̄_ij (the score before its mod), s = f(s̄) (the mod)."""
        value, = e.values([self.g], 0)
        e.line(0, f"sr = {value}")
        e.line(0, f"s = {self.printer.doprint(self.f)}")

    def gradients(self, e: Emitter) -> None:
        """dS̄ = dS ∂f/∂s̄ (the derivation's dSr step), the mod's θ, then dL/d(every array g reads) and the
        bilinear products' coefficients."""
        print_ = self.printer.doprint
        e.line(0, f"dsr = ds * ({print_(self.slope)})")
        for read, coefficient in self.scatters:
            target = sympy.IndexedBase(sympy.Symbol("d" + read.base.label.name))[read.indices]
            e.line(0, f"{print_(target)} += ds * ({print_(coefficient)})")
        emit_accumulations(e, [_local(a) for a in self.seeds], 0)
        dsr = sympy.Symbol("dsr")
        for n, value in enumerate(e.values([tidy(dsr * sympy.diff(self.g, m.symbol)) for m in self.products], 0)):
            e.line(0, f"C{n}[ti, j] = {value}")

    def chain(self, side: str) -> str:
        items = [a for h in self.hoisted if h.side == side for a in _chain(h, self.by_name)]
        return self.run(lambda e: emit_accumulations(e, items, 0))[0]


#: The template's names for the softmax steps' tensors (the derivation's O, D, dS, dV summands print with them).
SOFTMAX_READS = {"P": "p", "dP": "dp", "D": "D_i", "dS": "ds", "O": "O[z, i, b]", "dO": "dO[z, i, b]",
                 "V": "V[vz, j, b]"}


def render(score: str, mod, mask, key: str) -> str:
    """The element-kernel module of (score, mod, mask) (deterministic, stamped); `key`: the name of the file it
    goes to (its stem), which the module declares as CACHE_KEY."""
    spec = _spec(score, mod)
    d = derive(spec, explicit=False)  # indexed forms hold at any size
    s_bar = d.step("similarity").rhs * SCALE if SCORES[score].scaled else d.step("score").rhs
    g, hoisted = hoist(fresh_dummies(s_bar))
    g, products = bilinear(g, {h.name: h for h in hoisted})
    params, mask_arrays = _params(spec), tuple(name for name, _ in getattr(mask, "arrays", ()) or ())
    printer = ElementPrinter({"arrays": _arrays(params, hoisted, mask_arrays),
                              "symbol_map": {SCALE: "scale", B_IDX: "bb", H_IDX: "hh",
                                             **{m.symbol: f"M{n}[ti, j]" for n, m in enumerate(products)}}})
    blocks = _Blocks(g, hoisted, products, spec.mod_object, printer)
    steps = NumbaPrinter({"indexed_map": SOFTMAX_READS})
    source = (f"the indexed derivation of {spec.title.split(' (')[0].lower()}"
              f"{'' if mod is None else ' with score mod ' + mod.text}{'' if mask is None else ', mask ' + mask.text}")
    text = _ENV.get_template("element.py.j2").render(
        header=HEADER.substitute(source=source, command="generated on first use by symattn.numeric.variants"),
        key=key,
        score=score, mod="none" if mod is None else mod.text, mask="none" if mask is None else mask.text,
        params=params, params_data=repr(tuple((n, t, tuple(dims)) for n, t, dims in params)),
        mask_arrays=list(mask_arrays), mask_arrays_data=repr(mask_arrays), sizes=_sizes(params),
        hoisted=[dict(name=h.name, side=h.side, code=blocks.run(lambda e, h=h: blocks.hoisted_block(h, e))[0],
                      shape=", ".join(["n_q" if h.side == "q" else "n_k"] + [dim for _, dim in h.outer]))
                 for h in hoisted],
        condition=printer.doprint(_mask_condition(mask)), span=[printer.doprint(x) for x in _mask_span(mask)],
        pair=blocks.run(blocks.pair)[0], backward=blocks.run(blocks.pair, blocks.gradients),
        chain_q=blocks.chain("q"), chain_k=blocks.chain("k"), products=[_product(m, hoisted) for m in products],
        row_sums=[(_local_name(x), printer.doprint(x)) for x in blocks.row_sums],
        O_term=steps.doprint(_summand(d.step("output").rhs)), D_term=steps.doprint(_summand(d.step("D").rhs)),
        dP_term=steps.doprint(_summand(d.step("dP").rhs)), dS=steps.doprint(d.step("dS").rhs),
        dV_term=steps.doprint(_summand(d.step("dV").rhs)),
        jit=decorator(), jit_parallel=decorator(parallel=True), jit_exact=decorator(inline=True, exact=True))
    return stamp(text)


def _product(m: Bilinear, hoisted: list[Hoisted]) -> dict[str, str]:
    """Array code of a bilinear product's operands, their gradients and their widths."""
    def code(name):
        if name in ("Q", "K"):
            return f"{name}[{name.lower()}z]", f"d{name}[z]", "d_k"
        h = next(h for h in hoisted if h.name == name)
        return h.name, "d" + h.name, h.outer[0][1]
    (X, dX, width), (Y, dY, _) = code(m.X), code(m.Y)
    return dict(X=X, dX=dX, Y=Y, dY=dY, width=width)


def write(score: str, mod, mask, folder, name: str) -> None:
    """Render (score, mod, mask) and write it as `name`.py into `folder` through the one writer."""
    write_files({f"{name}.py": render(score, mod, mask, name)}, folder, force=True)
