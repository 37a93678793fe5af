"""Generate Numba kernels from a derivation: unrolled (exact sizes) and loop (any size) kernels.

`write_files` (files.py) is the one function that writes generated code to disk; every rendering carries a
content hash (filestamp.py) that the writer and the kernel cache check.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..symbolic.derive import derive, parameters
from ..errors import SymattnError
from ..filestamp import stamp
from ..outputs import comment_command
from ..symbolic.layer import derive_multihead
from ..progress import Progress, silent
from ..symbolic.spec import AttentionSpec, MultiHeadSpec
from ..symbolic.tensors import TENSORS
from . import names
from .files import diff_files, refused, write_files, write_folders
from .loop import LOOP_MODULE, render as render_loops
from .templates import DOC_HEADER, ENV, HEADER, decorator
from .unrolled import kernel_code, pays_for

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


def render_unrolled(spec, progress: Progress = silent, out_dir: str = "generated/") -> str:
    """Source of the unrolled forward and backward kernels of a single head or a multi-head layer; its header's
    command writes into `out_dir`."""
    layer = isinstance(spec, MultiHeadSpec)
    d = (derive_multihead if layer else derive)(spec, prove=False)
    code = {}
    for kind in ("forward", "backward"):
        progress(f"generate: unrolled {kind} of {spec.name}")
        code[kind] = kernel_code(d, kind)
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "_"}
    fields["scale"] = None if spec.scale is None else str(spec.scale)
    fields["mask"] = spec.mask if isinstance(spec.mask, str) else spec.mask.text  # a user's mask: its name
    template = ENV.get_template("layer.py.j2" if layer else "unrolled.py.j2")
    variant = dict(variant=_variant(spec, fields["mask"]),
                   params=[(p.tensor, TENSORS[p.tensor].shape(spec)) for p in parameters(spec)])
    return stamp(template.render(header=HEADER.substitute(source=repr(spec), command=command(spec, out_dir)),
                                 title=spec.title, spec=repr(fields), key=spec.name, jit=decorator(), **code,
                                 **variant, **spec.sizes))


def _variant(spec: AttentionSpec | MultiHeadSpec, mask: str) -> dict | None:
    """The variant as the unrolled file's docstring names it (parameters by kernel argument name); None for the
    dot product, unmasked or causal."""
    if spec.score == "dot" and spec.mod_object is None and mask in ("none", "causal"):
        return None
    mod_params = [p.tensor for p in spec.mod_object.params] if spec.mod_object else []
    return {"score": spec.score, "score_params": [p.tensor for p in parameters(spec) if p.tensor not in mod_params],
            "mod": spec.mod_object and spec.score_mod, "mod_params": mod_params,
            "mask": None if mask == "none" else mask}


def render(spec, progress: Progress = silent, out_dir: str = "generated/") -> dict[str, str]:
    """File name -> source for `spec`: its unrolled kernels where they pay, and the loop kernels (both headers'
    command writes into `out_dir`)."""
    files = {f"{LOOP_MODULE}.py": render_loops(command(spec, out_dir))}
    if pays_for(spec):
        files[f"{spec.name}.py"] = render_unrolled(spec, progress, out_dir)
    return files


def generate(spec: AttentionSpec, out_dir: str | Path = "generated", *, progress: Progress = silent,
             force: bool = False) -> list[Path]:
    """Write the kernels of `spec` into `out_dir`; returns the paths. `force`: see `write_files`."""
    return write_files(render(spec, progress, shown_folder(out_dir)), out_dir, force=force)


def shown_folder(out_dir: str | Path) -> str:
    """`out_dir` as a generated file's header writes it after -o: shell-quoted, and "DIR" where it holds a
    character that would end the header's comment line (a newline) or not print."""
    return comment_command([os.fspath(out_dir).rstrip("/") + "/"]) or "DIR"


def render_doc(spec, progress: Progress = silent, *, derivation=None, command: str = "symattn generate --all",
               **options) -> str:
    """The derivation page of `spec` (Markdown, proofs included) under its generated-file header: `symattn docs`'
    derivation.md and the committed docs/ pages both come from here. `derivation`: `spec`'s, when already made;
    `options`: Derivation.to_markdown's (notation=...)."""
    d = derivation or (derive_multihead if isinstance(spec, MultiHeadSpec) else derive)(spec, progress=progress)
    return stamp(DOC_HEADER.substitute(source=repr(spec), command=command) + d.to_markdown(**options))


def source_checkout() -> bool:
    """Whether symattn runs from a source checkout, the only place with committed generated files."""
    return (REPO_GENERATED.parent / "pyproject.toml").is_file()


def committed_files(progress: Progress = silent) -> dict[Path, str]:
    """Every generated file the repository commits: generated/, docs/, the package's loop kernels and its table
    of score names."""
    if not source_checkout():
        raise SymattnError(f"there are no committed generated files outside a source checkout (no pyproject.toml "
                           f"in {REPO_GENERATED.parent}): nothing to check or regenerate here; "
                           f"write kernels for your sizes with `symattn generate ... -o DIR`")
    files = {PACKAGE_DIR / "numeric" / f"{LOOP_MODULE}.py": render_loops(),  # the copy the numeric API imports
             PACKAGE_DIR / "symbolic" / f"{names.MODULE}.py": names.render()}  # score names without SymPy
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
    return write_folders({folder: {p.name: t for p, t in files.items() if p.parent == folder}
                          for folder in sorted({p.parent for p in files})}, force=force)
