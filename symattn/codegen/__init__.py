"""Generate Numba kernels from a derivation: unrolled (exact sizes) and loop (any size) kernels.

`write_files` (files.py) is the one function that writes generated code to disk; every rendering carries a
content hash (filestamp.py) that the writer and the kernel cache check.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..symbolic.derive import derive
from ..errors import SymattnError
from ..filestamp import stamp
from ..symbolic.layer import derive_multihead
from ..progress import Progress, silent
from ..symbolic.spec import AttentionSpec, MultiHeadSpec
from .files import diff_files, refused, write_files
from .loop import LOOP_MODULE, render as render_loops
from .templates import DOC_HEADER, HEADER, LAYER_FILE, LAYER_KERNEL, UNROLLED_FILE, UNROLLED_KERNEL, decorator
from .unrolled import KernelCode, kernel_code, pays_for

#: The specs whose kernels are committed in generated/: the embedded default (plain and causal), the
#: benchmark's and tests' small shapes, and the default two-head layer and a grouped-query layer.
STANDARD_SPECS = (AttentionSpec(6, 6, 4), AttentionSpec(6, 6, 4, mask="causal"), AttentionSpec(5, 5, 2),
                  AttentionSpec(3, 4, 2, 3), MultiHeadSpec(6, 4, 2), MultiHeadSpec(3, 4, 2, kv_heads=1))
PACKAGE_DIR = Path(__file__).resolve().parent.parent
REPO_GENERATED = PACKAGE_DIR.parent / "generated"
REPO_DOCS = PACKAGE_DIR.parent / "docs"
#: Markdown derivations committed in docs/ for documentation pages.
DOC_SPECS = {"single-head-causal.md": AttentionSpec(3, 4, 2, 3, mask="causal"),
             "multi-head-gqa.md": MultiHeadSpec(3, 4, 2, kv_heads=1)}


def command(spec, out_dir: str = "generated/") -> str:
    return f"symattn generate {spec.cli_args()} -o {out_dir}"


def _kernel(code: KernelCode, doc: str, batched: bool = False) -> str:
    indent = " " * (8 if batched else 4)
    fields = dict(
        decorator=decorator(), name=code.name, arguments=", ".join(code.arguments), doc=doc, ops=code.block.ops,
        inputs="\n".join(f"{indent}{local} = {read}" for local, read in code.inputs),
        terms="\n".join(f"{indent}{lhs} = {rhs}" for lhs, rhs in code.block.statements),
        outputs="\n".join(f"{indent}{write} {op} {local}" for write, op, local in code.outputs))
    if not batched:
        return UNROLLED_KERNEL.substitute(fields)
    zero = "\n".join(f"    {name}[...] = 0.0" for name in code.accumulated) or "    pass"
    return LAYER_KERNEL.substitute(fields, zero=zero, first=code.arguments[0])


DOCS = {  # (forward, backward) kernel docstrings
    False: ("Writes O = softmax(scale Q K^T) V for Q, K, V", "Writes dQ, dK, dV of L = sum(dO * O) for Q, K, V, dO"),
    True: ("Writes Z (batch, n_q, d_model) of the layer", "Writes dx (and dy), dW_Q, dW_K, dW_V, dW_O (and bias "
                                                          "gradients) of L = sum(dZ * Z)"),
}


def render_unrolled(spec, progress: Progress = silent) -> str:
    """Source of the unrolled forward and backward kernels of a single head or a multi-head layer."""
    layer = isinstance(spec, MultiHeadSpec)
    d = (derive_multihead if layer else derive)(spec, prove=False)
    code = {}
    for kind in ("forward", "backward"):
        progress(f"generate: unrolled {kind} of {spec.name}")
        code[kind] = kernel_code(d, kind)
    kernels = "".join(_kernel(code[kind], doc, batched=layer) for kind, doc in zip(code, DOCS[layer]))
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "_"}
    fields["scale"] = None if spec.scale is None else str(spec.scale)
    fields["mask"] = spec.mask if isinstance(spec.mask, str) else spec.mask.text  # a user's mask: its name
    return stamp((LAYER_FILE if layer else UNROLLED_FILE).substitute(
        header=HEADER.substitute(source=repr(spec), command=command(spec)), title=spec.title, kernels=kernels,
        spec=repr(fields), forward_ops=code["forward"].block.ops, backward_ops=code["backward"].block.ops,
        **spec.sizes))


def render(spec, progress: Progress = silent) -> dict[str, str]:
    """File name -> source for `spec`: its unrolled kernels where they pay, and the loop kernels."""
    files = {f"{LOOP_MODULE}.py": render_loops()}
    if pays_for(spec):
        files[f"{spec.name}.py"] = render_unrolled(spec, progress)
    return files


def generate(spec: AttentionSpec, out_dir: str | Path = "generated", *, progress: Progress = silent,
             force: bool = False) -> list[Path]:
    """Write the kernels of `spec` into `out_dir`; returns the paths. `force`: see `write_files`."""
    return write_files(render(spec, progress), out_dir, force=force)


def render_doc(spec, progress: Progress = silent) -> str:
    """A Markdown derivation (with its proofs) for a documentation page."""
    d = (derive_multihead if isinstance(spec, MultiHeadSpec) else derive)(spec, progress=progress)
    return stamp(DOC_HEADER.substitute(source=repr(spec), command="symattn generate --all") + d.to_markdown())


def source_checkout() -> bool:
    """Whether symattn runs from a source checkout, the only place with committed generated files."""
    return (REPO_GENERATED.parent / "pyproject.toml").is_file()


def committed_files(progress: Progress = silent) -> dict[Path, str]:
    """Every generated file the repository commits: generated/, docs/ and the package's loop kernels."""
    if not source_checkout():
        raise SymattnError(f"there are no committed generated files outside a source checkout (no pyproject.toml "
                           f"in {REPO_GENERATED.parent}): nothing to check or regenerate here; "
                           f"write kernels for your sizes with `symattn generate ... -o DIR`")
    files = {PACKAGE_DIR / "numeric" / f"{LOOP_MODULE}.py": render_loops()}  # the copy the numeric API imports
    for spec in STANDARD_SPECS:
        files[REPO_GENERATED / f"{spec.name}.py"] = render(spec, progress)[f"{spec.name}.py"]
    for name, spec in DOC_SPECS.items():
        files[REPO_DOCS / name] = render_doc(spec, progress)
    return files


def check(progress: Progress = silent) -> list[str]:
    """Unified diffs of committed generated files against a fresh rendering; empty when in sync."""
    return diff_files(committed_files(progress))


def regenerate_all(progress: Progress = silent, *, force: bool = False) -> list[Path]:
    """Rewrite every committed generated file (from a source checkout). `force`: see `write_files`."""
    files = committed_files(progress)
    written = []
    for folder in sorted({p.parent for p in files}):
        written += write_files({p.name: t for p, t in files.items() if p.parent == folder}, folder, force=force)
    return written
