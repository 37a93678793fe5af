"""`from symattn.mods import ...`, `from symattn.masks import ...`, `from symattn.reference import ...` work and
name the same objects as the attributes symattn.mods / masks / reference."""
import subprocess
import sys


def test_public_modules_import_by_name_and_are_the_implementation_modules():
    code = ("import symattn, symattn.symbolic.mods as m, symattn.symbolic.masks as k, symattn.numeric.reference as r\n"
            "from symattn.mods import ops, alibi\nfrom symattn.masks import causal, and_masks\n"
            "from symattn.reference import attention\n"
            "assert symattn.mods is m and symattn.masks is k and symattn.reference is r\n"
            "assert alibi is m.alibi and causal is k.causal and attention is r.attention and ops is m.ops\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
