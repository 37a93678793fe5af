"""Command line: thin wrappers over the Python API. Errors are one line and exit code 2."""
from __future__ import annotations

import argparse
import sys

from .. import limits
from ..errors import SymattnError
from ..symbolic.masks import text_forms_help
from ..symbolic.score_names import TEXTS
from ..symbolic.spec import SCORES  # SymPy-free: start-up stays light
from ..outputs import PICTURES, comment_command, output_file, output_folder, write_atomic
from ..progress import silent, to_stream

FORMATS = ("text", "latex", "markdown", "tex")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"symattn: error: {message} (see `{self.prog} --help`)\n")


def _variant_options(p) -> None:
    """The variant: mask, score (and its hidden size), score mod; derive, generate, verify, docs and run share them."""
    p.add_argument("--mask", default=None, metavar="MASK",
                   help=f"{text_forms_help()}, joined by & (and) or | (or)")
    p.add_argument("--score", default="dot", choices=SCORES,
                   help="; ".join(f"{name}: {text}" for name, text in TEXTS.items()) + " (default dot)")
    p.add_argument("--hidden", type=int, default=None, metavar="D_A", help="hidden units d_a of the additive score")
    p.add_argument("--score-mod", default=None, metavar="MOD",
                   help="alibi[:SLOPE] (s + slope(j - i), slope 1/256 by default), alibi:heads=H (slope "
                        "2^(-8(h+1)/H) for head h), softcap:C (C tanh(s/C)), "
                        "relative-bias:D (s + a learned B[clip(j - i, -D, D) + D])")


def _spec_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--n-q", type=int, required=required, help="number of queries")
    p.add_argument("--n-k", type=int, default=None, help="number of keys/values (single head: required)")
    p.add_argument("--d-k", type=int, default=None, help="query/key width (per head; single head: required)")
    p.add_argument("--d-v", type=int, default=None, help="value width (default d_k)")
    p.add_argument("--causal", action="store_true", help="causal mask: query i sees keys j <= i (= --mask causal)")
    p.add_argument("--scale", default=None, help="score scale, e.g. 0.5 or 1/8 (default 1/sqrt(d_k), exact)")
    _variant_options(p)
    p.add_argument("--masked-rows", default="zero", choices=("zero", "uniform", "nan"),
                   help="a query that sees no key: weights 0 (default, PyTorch), 1/n_k (uniform, JAX) or NaN "
                        "(numeric only: no derivation)")
    layer = p.add_argument_group("multi-head layer (any of these makes it a layer)")
    layer.add_argument("--d-model", type=int, default=None, help="model width")
    layer.add_argument("--heads", type=int, default=None, help="number of heads h")
    layer.add_argument("--kv-heads", type=int, default=None, help="key/value heads (grouped-query; default h)")
    layer.add_argument("--cross", action="store_true", help="cross-attention: keys and values from y (--n-k rows)")
    layer.add_argument("--bias", action="store_true", help="projection biases b_Q, b_K, b_V, b_O")


def _is_layer(args) -> bool:
    return any(x is not None for x in (args.d_model, args.heads, args.kv_heads)) or args.cross or args.bias


def _spec(args):
    from ..symbolic.spec import AttentionSpec, MultiHeadSpec
    if args.causal and args.mask not in (None, "causal"):
        raise SymattnError(f"--causal and --mask {args.mask} disagree: give one of them")
    mask = "causal" if args.causal else ("none" if args.mask is None else args.mask)  # --mask "": the spec's error
    if _is_layer(args):
        if args.d_model is None or args.heads is None:
            raise SymattnError("a multi-head layer needs --d-model and --heads")
        return MultiHeadSpec(args.n_q, args.d_model, args.heads, n_k=args.n_k, kv_heads=args.kv_heads, d_k=args.d_k,
                             d_v=args.d_v, cross=args.cross, bias=args.bias, scale=args.scale, mask=mask,
                             score=args.score, hidden=args.hidden, score_mod=args.score_mod or "none",
                             masked_rows=args.masked_rows)
    if args.n_k is None or args.d_k is None:
        raise SymattnError("give --n-k and --d-k (one head), or --d-model and --heads (a multi-head layer)")
    return AttentionSpec(args.n_q, args.n_k, args.d_k, args.d_v, scale=args.scale, mask=mask, score=args.score,
                         hidden=args.hidden, score_mod=args.score_mod or "none", masked_rows=args.masked_rows)


def _notation_options(p) -> None:
    p.add_argument("--entries", default="sample", metavar="sample|all|N",
                   help="explicit entries per step: a few samples (default), all, or the first N of query row 0")
    p.add_argument("--index-base", type=int, choices=(0, 1), default=0, help="indices from 0 (default) or 1")
    p.add_argument("--numbered", action="store_true", help="numbered equations with \\label{LABEL:step} (LaTeX)")
    p.add_argument("--label", default=None, help="label prefix of numbered equations (default eq)")
    p.add_argument("--section-level", type=int, default=1, metavar="L",
                   help="0 chapter, 1 section (default), 2 subsection, 3 subsubsection")
    p.add_argument("--fragment", action="store_true", help="tex: a fragment for \\input, not a whole document")
    p.add_argument("--name", action="append", default=[], metavar="TENSOR=LATEX",
                   help="rename a tensor in LaTeX and Markdown, e.g. --name Q=X (repeatable)")


def _notation(args):
    """The Notation the derive options ask for (errors name the option)."""
    from ..render.notation import Notation
    entries = args.entries
    if args.max_entries is not None:
        entries = "all" if args.max_entries == 0 else args.max_entries
    elif entries not in ("sample", "all"):
        if not entries.isdigit() or int(entries) < 1:
            raise SymattnError(f"--entries must be sample, all or a whole number >= 1, got {entries!r}")
        entries = int(entries)
    names = {}
    for item in args.name:
        tensor, sep, tex = item.partition("=")
        if not sep:
            raise SymattnError(f"--name takes TENSOR=LATEX (e.g. Q=X), got {item!r}")
        if tensor.strip() in names:
            raise SymattnError(f"--name gives {tensor.strip()} twice ({names[tensor.strip()]!r} and {tex.strip()!r}); "
                               f"give one")
        names[tensor.strip()] = tex.strip()
    return Notation(index_base=args.index_base, names=names, numbered=args.numbered, label=args.label,
                    level=args.section_level, standalone=not args.fragment, entries=entries)


def _write(path: str | None, text: str) -> None:
    if path is None:
        sys.stdout.write(text)
        return
    write_atomic(path, text)
    print(f"symattn: wrote {path}", file=sys.stderr)


def _seed(text: str) -> int:
    """argparse type: a non-negative integer seed (limits.seed's rule)."""
    try:
        return limits.seed(int(text))
    except (ValueError, SymattnError):
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: give a non-negative integer") from None


def cmd_derive(args) -> int:
    from ..symbolic.derive import derive as derive_head
    from ..symbolic.layer import derive_multihead
    if args.output is not None:
        output_file(args.output)
    spec = _spec(args)
    notation = _notation(args)  # checked before the derivation runs
    progress = silent if args.quiet else to_stream()
    derive = derive_multihead if _is_layer(args) else derive_head
    d = derive(spec, explicit=not args.indexed_only, prove=not args.no_prove and not args.indexed_only,
               progress=progress)
    if args.query is not None and not 0 <= args.query < spec.n_q:
        raise SymattnError(f"--query must be in 0..{spec.n_q - 1}, got {args.query}")
    render = {"text": d.to_text, "latex": d.to_latex, "markdown": d.to_markdown, "tex": d.to_tex_document}
    text = render[args.format](query=args.query, notation=notation)
    _write(args.output, text if args.output is None else _made_by(args.format, args.argv) + text)
    return 0 if not d.proofs or d.proved else 1


def _made_by(fmt: str, argv: list[str]) -> str:
    """The first line of a document `derive -o` writes: the command that made it, as a comment of its format (TeX
    %, Markdown's HTML comment; none in plain text, which has no comments). The command stays on the line: a
    character that would end it (a newline in a path) gives the short form."""
    made = comment_command(["symattn", *argv])
    if made is None or "-->" in made:
        made = "symattn derive ... (the command held characters a comment cannot)"
    line = f"Generated by symattn; regenerate with: {made}"
    return {"tex": f"% {line}\n", "latex": f"% {line}\n", "markdown": f"<!-- {line} -->\n\n"}.get(fmt, "")


DOCUMENT_SUFFIXES = {".tex": "tex", ".md": "markdown", ".markdown": "markdown", ".txt": "text"}


def cmd_run(args) -> int:
    from .run import run
    plot = None if args.plot is None else output_file(args.plot, PICTURES, default=".png")
    out = None if args.output is None else output_file(args.output)
    fmt = args.format or (DOCUMENT_SUFFIXES.get(out.suffix.lower(), "text") if out is not None else None)
    to_stdout = fmt is not None and out is None  # the document is the output: no narration
    result = run(args.sentence, inputs=args.inputs, query=args.query, causal=args.causal, mask=args.mask,
                 score=args.score, hidden=args.hidden, score_mod=args.score_mod, d_model=args.d_model, d_k=args.d_k,
                 d_v=args.d_v, progress=silent if args.quiet else to_stream(), plot=plot,
                 say=(lambda line: None) if to_stdout else print)
    if fmt is not None:
        _write(None if out is None else str(out), result.document.render(fmt))
    return 0 if result.passed else 1


def cmd_docs(args) -> int:
    from .docs import build_docs, worked_variant
    from .run import run
    output_folder(args.output)
    if args.n_q is None and not _is_layer(args) and args.n_k is None and args.d_k is None:
        args.n_q, args.n_k, args.d_k, args.d_v = 3, 4, 2, args.d_v or 3  # the README's derivation
    spec = _spec(args)
    notation = _notation(args)
    spec.check_explicit()  # all options checked before the worked example runs
    progress = silent if args.quiet else to_stream()
    progress("the worked example")
    worked = run(args.sentence, inputs=args.inputs, query=args.query, say=lambda line: None, progress=progress,
                 kernels=False, **worked_variant(spec))
    files = build_docs(spec, worked, args.output, notation=notation, progress=progress)
    print(f"symattn: wrote {len(files)} files into {args.output}; start at {files[-1]}", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    from .. import codegen
    progress = silent if args.quiet else to_stream()
    if args.check:
        files = codegen.committed_files(progress)  # SymattnError outside a source checkout
        diffs = codegen.diff_files(files)
        for diff in diffs:
            sys.stdout.write(diff)
        if diffs:
            edited = codegen.refused(files)  # files --all would refuse without --force
            fix = "symattn generate --all" + (" --force" if edited else "")
            names = ", ".join(map(str, edited))
            lost = f"; it replaces these, edited or without a content hash: {names}" if edited else ""
            print(f"symattn: {len(diffs)} generated file(s) drifted; regenerate with `{fix}`{lost}", file=sys.stderr)
            return 1
        print("symattn: generated files are in sync", file=sys.stderr)
        return 0
    if args.all:
        paths = codegen.regenerate_all(progress, force=args.force)
    else:
        if args.n_q is None:
            raise SymattnError("generate needs --n-q with --n-k and --d-k, or --d-model and --heads "
                               "(or --all / --check)")
        output_folder(args.output)
        paths = codegen.generate(_spec(args), args.output, progress=progress, force=args.force)
    for path in paths:
        print(path)
    return 0


def cmd_verify(args) -> int:
    from ..check.verification import verify, verify_multihead
    if args.gallery:
        from ..check.gallery import verify_gallery
        reports = verify_gallery(seed=args.seed, progress=silent if args.quiet else to_stream())
        for name, report in reports.items():
            print(f"== {name}\n{report}")
        return 0 if all(r.passed for r in reports.values()) else 1
    if args.n_q is None:
        raise SymattnError("verify needs --n-q with --n-k and --d-k (or --d-model and --heads), or --gallery")
    check = verify_multihead if _is_layer(args) else verify
    report = check(_spec(args), seed=args.seed, progress=silent if args.quiet else to_stream())
    print(report)
    return 0 if report.passed else 1


def cmd_bench(args) -> int:
    from . import bench
    cases = bench.QUICK if args.quick else bench.CASES
    layers = bench.LAYER_CASES[:1] if args.quick else bench.LAYER_CASES
    bench.bench(cases, layer_cases=layers, variants="quick" if args.quick else "all", out_dir=args.output,
                progress=silent if args.quiet else to_stream())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="symattn", description="Derive, explain, generate and check transformer attention.")
    parser.add_argument("--version", action="version", version=f"symattn {__import__('symattn').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="the worked example: 'The cat sat on the mat', or your own numbers")
    run.add_argument("--sentence", default=None, help="whitespace-separated tokens (default: The cat sat on the mat)")
    run.add_argument("--inputs", default=None, metavar="FILE",
                     help="your own numbers: JSON or .npz with tokens and X, W_Q, W_K, W_V [, W_O] or Q, K, V "
                          "(exact: integers, decimals, \"p/q\"; see the README)")
    run.add_argument("--query", default=None, help="token shown in detail (default: sat, or the first token)")
    run.add_argument("--causal", action="store_true", help="causal mask (= --mask causal)")
    _variant_options(run.add_argument_group("variant (the worked example's parameters get exact example values)"))
    run.add_argument("--d-model", type=int, default=None, help="embedding width (default 4)")
    run.add_argument("--d-k", type=int, default=None, help="query/key width (default 4)")
    run.add_argument("--d-v", type=int, default=None, help="value width (default d_k)")
    run.add_argument("--plot", default=None, metavar="PNG", help="also save a heatmap of all weights")
    run.add_argument("--format", choices=FORMATS, default=None,
                     help="write the worked example as a document (to -o FILE, else to stdout instead of the "
                          "narration); default with -o: by the suffix (.tex, .md, .txt), else text")
    run.add_argument("-o", "--output", default=None, metavar="FILE", help="write the worked example document here")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    run.set_defaults(func=cmd_run)

    der = sub.add_parser("derive", help="print every step of the derivation")
    _spec_options(der)
    der.add_argument("--format", choices=FORMATS, default="text")
    der.add_argument("-o", "--output", default=None, help="write to FILE instead of stdout")
    der.add_argument("--query", type=int, default=None, help="show explicit entries of this query row only")
    der.add_argument("--max-entries", type=int, default=None, help="explicit entries per step from query row 0 "
                     "(0 = all); the older form of --entries")
    _notation_options(der)
    der.add_argument("--indexed-only", action="store_true", help="indexed formulas only (any size)")
    der.add_argument("--no-prove", action="store_true", help="skip the proofs")
    der.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    der.set_defaults(func=cmd_derive)

    docs = sub.add_parser("docs", help="a documentation set: derivation (md, tex, pdf), worked example, heatmap, "
                                       "verification table, index.md")
    _spec_options(docs, required=False)
    _notation_options(docs)
    docs.add_argument("-o", "--output", default="symattn-docs", help="output folder (default symattn-docs/)")
    docs.add_argument("--sentence", default=None, help="the worked example's sentence (as `symattn run`)")
    docs.add_argument("--inputs", default=None, metavar="FILE", help="the worked example's numbers (as `symattn run`)")
    docs.add_argument("--query", default=None, metavar="TOKEN", help="the worked example's query token")
    docs.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    docs.set_defaults(func=cmd_docs, max_entries=None)

    gen = sub.add_parser("generate", help="write Numba kernels (unrolled for the sizes, loop for any size)")
    _spec_options(gen, required=False)
    gen.add_argument("-o", "--output", default="generated", help="output folder (default generated/)")
    gen.add_argument("--check", action="store_true", help="fail with a diff when committed generated files drift")
    gen.add_argument("--all", action="store_true", help="regenerate every committed generated file")
    gen.add_argument("--force", action="store_true", help="overwrite files edited by hand (or not written by symattn) "
                                                          "and replace symbolic links in the output folder")
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    gen.set_defaults(func=cmd_generate)

    ver = sub.add_parser("verify", help="symbolic vs unrolled vs loop kernels vs NumPy, and finite differences")
    _spec_options(ver, required=False)
    ver.add_argument("--gallery", action="store_true", help="verify the FlexAttention gallery of user-written "
                     "score and mask mods (symattn.check.gallery) instead of one spec")
    ver.add_argument("--seed", type=_seed, default=0, help="seed of the random dyadic inputs")
    ver.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    ver.set_defaults(func=cmd_verify)

    ben = sub.add_parser("bench", help="time symattn's kernels against PyTorch, JAX, FlexAttention and NumPy "
                                        "(those installed: the [bench] extra); ratios, targets, JSON and PNG plot")
    ben.add_argument("--quick", action="store_true", help="only (1,5,2) and (8,256,64), the first layer case and "
                     "the variants at (8,256,64)")
    ben.add_argument("-o", "--output", default="bench-results", help="folder for bench.json and bench.png")
    ben.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    ben.set_defaults(func=cmd_bench)
    return parser


def _tolerant_streams() -> None:
    """Text the terminal cannot encode (a token in another script on an ASCII terminal, bytes that were not
    UTF-8 on the command line) prints as escapes instead of raising UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):  # replaced by a test harness, or already closed
            pass


def main(argv: list[str] | None = None) -> int:
    try:
        _tolerant_streams()
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # what a written document says made it
        return args.func(args)
    except SymattnError as e:
        print(f"symattn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("symattn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
