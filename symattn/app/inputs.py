"""Your own numbers for `symattn run --inputs FILE`: a JSON or .npz file read into an exact `Example`, and the
inputs printed as labelled matrices (text, LaTeX, Markdown).

Schema (a JSON object, or a .npz archive with arrays of the same names):

    tokens   optional: n token strings (default t0, t1, ...)
    query    optional (JSON): the token shown in detail (--query wins; default the first token)
    comment  optional (JSON): any text, ignored
    and one of two forms:
    X, W_Q, W_K, W_V [, W_O]   embeddings X (n, d_model), projections W_Q, W_K (d_model, d_k), W_V (d_model, d_v),
                               optional W_O (d_v, d_model) for the two-head layer; Q = X W_Q, K = X W_K, V = X W_V
    Q, K, V                    Q, K (n, d_k) and V (n, d_v) directly

Matrices are lists of rows. Entries stay exact: integers, decimals (JSON numbers or strings: 0.1 is 1/10, 1e-2 is
1/100) or "p/q" strings. In a .npz, integer arrays are exact and a float is read as its shortest decimal
(0.1 -> 1/10); tokens are a 1-D string array. Nothing is evaluated as code (no eval, no sympify of text, no
pickles). Checked before any derivation, each error naming the file and the field: the file size (MAX_BYTES),
each entry's digits (MAX_DIGITS in numerator and denominator), the shapes, and the worked example's sizes
(limits.check_run_sizes, for the run's score and score mod: the exact derivation must stay tractable).
"""
from __future__ import annotations

import json
import math
import os
import re
import zipfile
from fractions import Fraction
from typing import Mapping

import numpy as np
import sympy

from .. import limits
from ..errors import InputError, SymattnError
from ..render.markdown import text as markdown_text  # the public name app/docs.py imports
from ..render.notation import tex_escape
from .example import Example, query_index

MAX_BYTES = 1 << 20  # an inputs file (and a .npz's unpacked arrays) at most 1 MiB
MAX_DIGITS = 20  # digits of an entry's numerator and of its denominator
MAX_TOKEN = 40  # characters of a token
EMBEDDINGS = ("X", "W_Q", "W_K", "W_V")
PROJECTED = ("Q", "K", "V")
KNOWN = ("tokens", "query", "comment", "W_O", *EMBEDDINGS, *PROJECTED)
_DECIMAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d{1,3})?")
_RATIO = re.compile(r"[+-]?\d+\s*/\s*\d+")


class _Number(str):
    """A JSON number kept as its text, so that 0.1 stays 1/10."""


#: Inputs files shipped in symattn/app/data/: `--inputs two-d` finds one when no such file is in the folder.
SHIPPED = ("the-cat-sat", "two-d")


def shipped(name: str) -> str:
    """Path of a shipped inputs file ("the-cat-sat": the default sentence; "two-d": the 2-D teaching example)."""
    from importlib import resources
    return str(resources.files("symattn.app").joinpath(f"data/{name.removesuffix('.json')}.json"))


def read_inputs(path: str | os.PathLike, *, query: str | None = None, variant: Mapping | None = None) -> Example:
    """The example in the inputs file at `path` (.npz by suffix or content, JSON otherwise), or a shipped one
    by name (SHIPPED); see the module doc. `variant`: the run's score, hidden and score_mod, whose limits the
    sizes must meet (limits.check_run_sizes; default the dot product's)."""
    source = os.fspath(path)
    if not os.path.exists(source) and source.removesuffix(".json") in SHIPPED:
        source = shipped(source)
    try:
        if not os.path.isfile(source):
            what = "a folder, not a file" if os.path.isdir(source) else "no such inputs file"
            raise InputError(f"{source}: {what} (give a .json or .npz file)")
        size = os.path.getsize(source)
        if size > MAX_BYTES:
            raise InputError(f"{source}: the file has {size} bytes, over the limit of {MAX_BYTES}")
        with open(source, "rb") as f:
            blob = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise InputError(f"{source}: cannot read it: {e.strerror or e}") from None
    data = _npz(source) if source.lower().endswith(".npz") or blob[:2] == b"PK" else _json(source, blob)
    return inputs_example(data, query=query, source=source, variant=variant)


def _json(source: str, blob: bytes) -> dict:
    def constant(name):
        raise InputError(f"{source}: {name} is not an exact number")
    try:
        data = json.loads(blob.decode("utf-8"), parse_float=_Number, parse_int=_Number, parse_constant=constant)
    except UnicodeDecodeError:
        raise InputError(f"{source}: not UTF-8 text (give a JSON file or a .npz archive)") from None
    except RecursionError:
        raise InputError(f"{source}: the JSON is nested too deeply") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{source}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, dict):
        raise InputError(f"{source}: the file must hold a JSON object with tokens and X, W_Q, W_K, W_V (or Q, K, V)")
    return data


def _npz(source: str) -> dict:
    try:
        with zipfile.ZipFile(source) as z:
            unpacked = sum(info.file_size for info in z.infolist())
        if unpacked > MAX_BYTES:
            raise InputError(f"{source}: the arrays unpack to {unpacked} bytes, over the limit of {MAX_BYTES}")
        with np.load(source, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise InputError(f"{source}: not a readable .npz archive of plain arrays ({e})") from None
    data = {}
    for name, a in arrays.items():
        if name == "tokens":
            if a.dtype.kind != "U" or a.ndim != 1:
                raise InputError(f"{source}: tokens must be a 1-D array of strings, got {a.dtype} with shape {a.shape}")
            data[name] = [str(t) for t in a]
        elif a.dtype.kind in "iuf":
            data[name] = a.tolist()
        else:
            raise InputError(f"{source}: {name} must be an integer or float array, got dtype {a.dtype}")
    return data


def inputs_example(data: Mapping, *, query: str | None = None, source: str = "inputs",
                   variant: Mapping | None = None) -> Example:
    """An Example from a mapping in the inputs schema (the module doc): lists of rows or NumPy arrays, entries
    as int, float, str, Fraction or sympy.Rational. Raises InputError naming `source` and the field. `variant`
    as for read_inputs."""
    if not isinstance(data, Mapping):
        raise InputError(f"{source}: the inputs must be a mapping of names to matrices, got {type(data).__name__}")
    unknown = [str(k) for k in data if k not in KNOWN]
    if unknown:
        raise InputError(f"{source}: unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(KNOWN)}")
    given = [k for k in (*EMBEDDINGS, *PROJECTED) if k in data]
    if any(k in data for k in EMBEDDINGS) and any(k in data for k in PROJECTED):
        raise InputError(f"{source}: give X, W_Q, W_K, W_V or Q, K, V, not both (got {', '.join(given)})")
    names = EMBEDDINGS if any(k in data for k in EMBEDDINGS) or not given else PROJECTED
    missing = [k for k in names if k not in data]
    if missing:
        raise InputError(f"{source}: missing {', '.join(missing)} (the form {', '.join(names)} needs all of them)")
    if "W_O" in data and names is PROJECTED:
        raise InputError(f"{source}: W_O goes with X, W_Q, W_K, W_V (the two-head layer needs the embeddings)")
    shapes = {k: _shape(source, k, data[k]) for k in (*names, *(["W_O"] if "W_O" in data else []))}
    n = shapes[names[0]][0]
    tokens = _tokens(source, data.get("tokens"), n, names[0])
    _check_shapes(source, shapes, names)
    _check_sizes(source, shapes, names, variant or {})
    M = {k: sympy.ImmutableMatrix([[_entry(source, f"{k}[{r}][{c}]", x) for c, x in enumerate(row)]
                                   for r, row in enumerate(_rows(data[k]))]) for k in shapes}
    if query is None and data.get("query") is not None:
        if not isinstance(data["query"], str):
            raise InputError(f"{source}: query must be a token (a string), got {data['query']!r}")
        query = data["query"]
    try:
        i = query_index(tokens, query)
    except SymattnError as e:
        raise InputError(f"{source}: {e}") from None
    label = f"the inputs file {source}"
    if names is PROJECTED:
        return Example(tokens, i, M["Q"], M["K"], M["V"], source=label)
    return Example.from_embeddings(tokens, i, M["X"], M["W_Q"], M["W_K"], M["W_V"], M.get("W_O"), source=label)


def _rows(value) -> list:
    return value.tolist() if isinstance(value, np.ndarray) else value


def _shape(source: str, name: str, value) -> tuple[int, int]:
    """(rows, columns) of a matrix given as a list of equal-length lists (or a 2-D array)."""
    value = _rows(value)
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(r, (list, tuple)) for r in value):
        raise InputError(f"{source}: {name} must be a matrix: a non-empty list of rows, each a list of numbers")
    width = len(value[0])
    for r, row in enumerate(value):
        if len(row) != width or not row:
            raise InputError(f"{source}: {name} row {r} has {len(row)} entries, row 0 has {width}")
    return len(value), width


def _tokens(source: str, tokens, n: int, first: str) -> tuple[str, ...]:
    if tokens is None:
        return tuple(f"t{k}" for k in range(n))
    tokens = _rows(tokens)
    if not isinstance(tokens, (list, tuple)) or not all(isinstance(t, str) for t in tokens):
        raise InputError(f"{source}: tokens must be a list of strings")
    if len(tokens) != n:
        raise InputError(f"{source}: tokens has {len(tokens)} entries but {first} has {n} rows (one per token)")
    for k, t in enumerate(tokens):
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"{source}: tokens[{k}] is not valid UTF-8 text") from None
        if not t.strip() or len(t) > MAX_TOKEN or any(not c.isprintable() for c in t):
            raise InputError(f"{source}: tokens[{k}] = {t[:MAX_TOKEN]!r} must be 1 to {MAX_TOKEN} printable "
                             f"characters, not only spaces")
    return tuple(tokens)


def _check_shapes(source: str, shapes: dict, names: tuple) -> None:
    """Every matrix's shape against the first one's (X or Q) and each other, the error naming the size."""
    if names is EMBEDDINGS:
        n, d_model = shapes["X"]
        rules = [("W_Q", 0, "d_model", d_model, ""), ("W_K", 0, "d_model", d_model, ""),
                 ("W_V", 0, "d_model", d_model, ""), ("W_K", 1, "d_k", shapes["W_Q"][1], " (as W_Q)")]
        if "W_O" in shapes:
            rules += [("W_O", 0, "d_v", shapes["W_V"][1], " (the columns of W_V)"), ("W_O", 1, "d_model", d_model, "")]
    else:
        n, d_k = shapes["Q"]
        rules = [("K", 0, "n", n, " (one per token, as Q)"), ("V", 0, "n", n, " (one per token, as Q)"),
                 ("K", 1, "d_k", d_k, " (as Q)")]
    for name, axis, size, expected, note in rules:
        got = shapes[name][axis]
        if got != expected:
            raise InputError(f"{source}: {name} must have {size} = {expected} {('rows', 'columns')[axis]}{note}, "
                             f"got {got}")


def _check_sizes(source: str, shapes: dict, names: tuple, variant: Mapping) -> None:
    """The worked example's limits for the run's variant (symattn.limits), stated for the file."""
    if names is EMBEDDINGS:
        n, d_model = shapes["X"]
        d_k, d_v = shapes["W_Q"][1], shapes["W_V"][1]
    else:
        (n, d_k), d_v = shapes["Q"], shapes["V"][1]
        d_model = d_k
    try:
        limits.check_run_sizes(n, d_model, d_k, d_v, names=("d_model", "d_k", "d_v"), source="the file", **variant)
    except SymattnError as e:
        raise type(e)(f"{source}: {e}") from None


def _entry(source: str, where: str, x) -> sympy.Rational:
    """One exact entry: int, float (its shortest decimal), decimal or p/q text, Fraction or Rational."""
    if isinstance(x, (bool, np.bool_)) or x is None:
        value = None
    elif isinstance(x, (int, np.integer, Fraction, sympy.Rational)) and not isinstance(x, _Number):
        value = Fraction(int(x)) if isinstance(x, (int, np.integer)) else Fraction(str(x))
    elif isinstance(x, (float, np.floating)):
        value = Fraction(repr(float(x))) if math.isfinite(x) else None
    elif isinstance(x, str) and len(x) <= 2 * MAX_DIGITS + 8 and (_DECIMAL.fullmatch(x.strip())
                                                                  or _RATIO.fullmatch(x.strip())):
        try:
            value = Fraction(x.strip().replace(" ", ""))
        except ZeroDivisionError:
            value = None
    else:
        value = None
    if value is None:
        raise InputError(f"{source}: {where} = {x!r} is not an exact number (an integer, a decimal or \"p/q\")")
    if max(len(str(abs(value.numerator))), len(str(value.denominator))) > MAX_DIGITS:
        raise InputError(f"{source}: {where} = {x!r} has more than {MAX_DIGITS} digits in its numerator or "
                         f"denominator (the exact derivation would not stay tractable)")
    return sympy.Rational(value.numerator, value.denominator)


# -- the inputs as labelled matrices ------------------------------------------------------------------------------

def input_matrices(ex: Example) -> list[tuple[str, str, sympy.ImmutableMatrix, tuple[str, ...] | None]]:
    """(name, what it is, matrix, row labels or None) of every input, in reading order: X, the projections,
    then Q, K, V (rows labelled by token)."""
    n = len(ex.tokens)
    out = []
    if ex.X is not None:
        out += [("X", f"the embeddings, one row per token ({n} × {ex.X.cols})", ex.X, ex.tokens),
                ("W_Q", f"the query projection ({ex.W_Q.rows} × {ex.W_Q.cols})", ex.W_Q, None),
                ("W_K", f"the key projection ({ex.W_K.rows} × {ex.W_K.cols})", ex.W_K, None),
                ("W_V", f"the value projection ({ex.W_V.rows} × {ex.W_V.cols})", ex.W_V, None)]
        made = " = X W_{}"
    else:
        made = ""
    for name, M in (("Q", ex.Q), ("K", ex.K), ("V", ex.V)):
        out.append((name + made.format(name), f"one row per token ({n} × {M.cols})", M, ex.tokens))
    return out


def matrix_text(M: sympy.ImmutableMatrix, labels=None) -> list[str]:
    """Rows `label  [ a  b  c ]` with exact entries (1/2), right-aligned."""
    cells = [[str(x) for x in M.row(r)] for r in range(M.rows)]
    width = max(len(c) for row in cells for c in row)
    pad = max((len(t) for t in labels), default=0) if labels else 0
    return [f"  {(labels[r] if labels else ''):<{pad}}  [ " + "  ".join(c.rjust(width) for c in row) + " ]"
            for r, row in enumerate(cells)]


def tex_token(token: str) -> str:
    r"""A token in LaTeX text mode: specials escaped; characters outside ASCII as U+XXXX (pdflatex's fonts
    lack most scripts)."""
    return "".join(c if c.isascii() else _TEX_CHARS.get(c, f"U+{ord(c):04X}") for c in tex_escape(token))


_TEX_CHARS = {"×": r"$\times$", "−": "-", "–": "--", "—": "---", "’": "'", "“": "``", "”": "''"}


def matrix_latex(name: str, M: sympy.ImmutableMatrix, labels=None) -> str:
    r"""`X = [labels] \begin{bmatrix} ... \end{bmatrix}`, entries as p/q so rows line up with the labels."""
    body = r" \\ ".join(" & ".join(str(x) for x in M.row(r)) for r in range(M.rows))
    matrix = r"\begin{bmatrix} " + body + r" \end{bmatrix}"
    if labels:
        column = r" \\ ".join(r"\text{" + tex_token(t) + "}" for t in labels)
        matrix = r"\begin{array}{r} " + column + r" \end{array} " + matrix
    return f"{name} = {matrix}"


def matrix_markdown(M: sympy.ImmutableMatrix, labels=None) -> list[str]:
    """A Markdown table: a token column (or the row index) and one column per feature."""
    head = "| " + ("token" if labels else "row") + " | " + " | ".join(str(c) for c in range(M.cols)) + " |"
    rule = "|---|" + "---:|" * M.cols
    rows = [f"| {markdown_text(labels[r]) if labels else r} | " + " | ".join(str(x) for x in M.row(r)) + " |"
            for r in range(M.rows)]
    return [head, rule, *rows]
