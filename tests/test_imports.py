"""The import contract: data flows one way (symbolic -> render / codegen -> check, app on top), numeric and the
generated kernels never import SymPy, and no module imports another that imports it back."""
import ast
import subprocess
import sys
from pathlib import Path

import symattn

PACKAGE = Path(symattn.__file__).parent
#: Sub-package -> the sub-packages it may import (top-level helpers: errors, progress, limits, outputs, filestamp
#: are shared by all).
ALLOWED = {
    "symbolic": {"symbolic"},
    "render": {"render", "symbolic"},
    "codegen": {"codegen", "symbolic"},
    "numeric": {"numeric"},
    "check": {"check", "numeric", "symbolic"},
    "app": {"app", "symbolic", "render", "codegen", "numeric", "check"},
}
SHARED = {"errors", "progress", "limits", "outputs", "filestamp"}
#: Imports made inside a function on purpose, each a convenience at the edge of the flow.
LAZY_EXCEPTIONS = {
    ("symbolic.derive", "render.latex"),  # Derivation.to_latex() and friends print through render
    ("numeric.kernel_cache", "codegen"),  # a missing cached kernel is generated on first use (needs SymPy then)
    ("numeric.kernel_cache", "codegen.unrolled"),
    # the numeric API's variant options (names, mods, masks: no SymPy) and element kernels generated on first use
    ("numeric.variants", "symbolic.spec"),
    ("numeric.variants", "symbolic.masks"),
    ("numeric.variants", "symbolic.mods"),
    ("numeric.variants", "codegen.element"),
    # the oracle takes library score-mod and mask texts as the API takes them (parsed without SymPy)
    ("numeric.reference", "symbolic.mods"),
    ("numeric.reference", "symbolic.masks"),
    ("numeric.reference", "symbolic.score_names"),  # the scores' parameter names (generated, plain data)
}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported symattn module, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text())
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    top = {id(node) for node in tree.body}
    hints = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and getattr(node.test, "id", "") ==
             "TYPE_CHECKING" for n in ast.walk(node)}  # `if TYPE_CHECKING:` imports never run
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level and id(node) not in hints:
            base = package[:len(package) - node.level + 1] if node.level > 1 else package
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names = [target] if node.module else [".".join([*base, a.name]) for a in node.names]
            found += [(t, id(node) in top) for t in names]
    return found


def _package_of(module: str) -> str:
    return module.split(".")[0]


def test_sub_packages_import_only_along_the_flow():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        for target, _ in _imports(name, path):
            src, dst = _package_of(name), _package_of(target)
            if src in ALLOWED and dst not in ALLOWED[src] | SHARED and (name, target) not in LAZY_EXCEPTIONS:
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def test_no_import_cycles():
    """Counting every import, lazy ones too: a module never reaches itself."""
    modules = _modules()
    graph = {name: {t for t, _ in _imports(name, path) if t in modules and t != name}
             for name, path in modules.items()}

    def reaches(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt == start:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False
    cycles = [name for name in graph if not name.endswith("__init__") and reaches(name) and "." in name]
    assert not cycles, f"modules in an import cycle: {cycles}"


def test_numeric_and_generated_kernels_never_import_sympy(tmp_path):
    """Numbers through the API, the layer and a cached unrolled kernel, in a fresh process: SymPy stays out."""
    code = f"""
import sys, numpy as np
from pathlib import Path
from symattn.numeric import api, layer, reference
from symattn.numeric.kernels import load_unrolled
x = np.ones((2, 3, 4))
api.attention(x, x, x); api.attention_backward(x, x, x, x); api.attention_weights(x, x)
layer.multihead_attention(x, np.eye(4), np.eye(4), np.eye(4), np.eye(4), heads=2)
assert 'sympy' not in sys.modules, 'the numeric API imported SymPy'
import symattn
spec = symattn.AttentionSpec(2, 3, 2)  # spec is SymPy-free until a derivation is asked for
module = load_unrolled(spec, Path({str(tmp_path)!r}))  # generates: SymPy allowed here
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    check = f"""
import sys
from pathlib import Path
import symattn
from symattn.numeric.kernels import load_unrolled
module = load_unrolled(symattn.AttentionSpec(2, 3, 2), Path({str(tmp_path)!r}))  # cached: no SymPy
import numpy as np
Q = np.ones((2, 2)); K = V = np.ones((3, 2)); O = np.empty((2, 2))
getattr(module, symattn.AttentionSpec(2, 3, 2).name + '_forward')(Q, K, V, O)
print('sympy' in sys.modules, O[0, 0])
"""
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert result.stdout.split() == ["False", "1.0"], result.stderr[-2000:]


def test_the_command_line_starts_without_sympy():
    code = "import sys, symattn.app.cli; print('sympy' in sys.modules or 'numba' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
