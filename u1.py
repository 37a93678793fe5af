import symattn, numpy as np
from symattn import AttentionSpec
from symattn.symbolic import usermods
for name, f in [("ident", lambda score, b, h, q_idx, kv_idx: score), ("h", lambda score, b, h, q_idx, kv_idx: h), ("b", lambda score, b, h, q_idx, kv_idx: b), ("q", lambda score, b, h, q_idx, kv_idx: q_idx), ("rel", lambda score, b, h, q_idx, kv_idx: score > 0), ("const", lambda s,b,h,q,kv: 3)]:
    try:
        m = symattn.mods.score_mod(f, name=name) if hasattr(symattn.mods, "score_mod") else None
        print(name, "accepted", m.text if m is not None else None)
        r = symattn.verify(AttentionSpec(2, 3, 1, score_mod=m))
        print("  verify", r.passed)
        q = np.ones((2,1)); print("  api", symattn.attention(q, np.ones((3,1)), np.ones((3,1)), score_mod=f).ravel())
    except Exception as e:
        print(name, "refused:", type(e).__name__, str(e)[:200])
