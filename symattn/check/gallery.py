"""A gallery of user-written score mods and mask mods, ported from FlexAttention's public examples, each traced
and verified four ways (exact symbolic, unrolled kernels, NumPy reference, finite differences of every input and
parameter) at small sizes.

Sources (ported by hand; the torch calls become symattn.mods.ops, the closed-over tensors symattn.mods.table):
attention-gym, https://github.com/pytorch-labs/attention-gym (BSD-3-Clause): attn_gym/mods/alibi.py
(generate_alibi_bias), attn_gym/mods/softcapping.py (generate_tanh_softcap), attn_gym/masks/sliding_window.py
(generate_sliding_window), attn_gym/masks/prefix_lm.py (generate_prefix_lm_mask), attn_gym/masks/document_mask.py
(generate_doc_mask_mod), attn_gym/masks/dilated_sliding_window.py (generate_dilated_sliding_window),
attn_gym/masks/natten.py (generate_natten: integer division and remainder of the indices); the FlexAttention
blog post, https://pytorch.org/blog/flexattention/ (relative_positional,
and the learned bias a score_mod closes over).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..progress import Progress, silent
from ..symbolic import masks
from ..symbolic.mods import ops, score_mod, table
from ..symbolic.spec import AttentionSpec

#: Sizes of every gallery spec: n_q = n_k = 3 keeps the unrolled kernels quick to compile and shows each mask.
N, D_K = 3, 2


@dataclass(frozen=True)
class Example:
    """One ported example: its name, where it comes from, and the spec options it gives (score_mod, mask)."""

    name: str
    source: str
    options: Callable[[], dict]
    n: int = N  # queries = keys

    def spec(self) -> AttentionSpec:
        return AttentionSpec(self.n, self.n, D_K, **self.options())


# -- score mods ---------------------------------------------------------------------------------------------

def generate_alibi_bias(H: int):
    """attn_gym/mods/alibi.py: slope 2^(-8(h+1)/H) of head h (torch.exp2 -> ops.exp2)."""
    def alibi_mod(score, b, h, q_idx, kv_idx):
        scale = ops.exp2(-((h + 1) * 8.0 / H))
        bias = (kv_idx - q_idx) * scale
        return score + bias
    return alibi_mod


def generate_tanh_softcap(soft_cap: int):
    """attn_gym/mods/softcapping.py (the exact tanh; the approximate PTX one is a GPU detail)."""
    def tanh_softcap(score, b, h, q_idx, kv_idx):
        return soft_cap * ops.tanh(score / soft_cap)
    tanh_softcap.__name__ = f"tanh_softcap_{soft_cap}"
    return tanh_softcap


def relative_positional(score, b, h, q_idx, kv_idx):
    """The FlexAttention blog's relative position encoding."""
    return score + (q_idx - kv_idx)


def generate_learned_bias(n: int):
    """The FlexAttention blog's learned bias, as a table of the 2n - 1 distances kv_idx - q_idx (shifted by
    n - 1 so every index lies in the table; torch would wrap a negative index silently)."""
    bias = table("relbias", 2 * n - 1)

    def learned_bias(score, b, h, q_idx, kv_idx):
        return score + bias[kv_idx - q_idx + n - 1]
    return learned_bias


# -- mask mods ------------------------------------------------------------------------------------------------

def causal_mask(b, h, q_idx, kv_idx):
    """attn_gym/masks/causal.py."""
    return q_idx >= kv_idx


def generate_sliding_window(window_size: int):
    """attn_gym/masks/sliding_window.py: the lookback window and the causal mask."""
    def sliding_window(b, h, q_idx, kv_idx):
        return q_idx - kv_idx <= window_size
    return masks.and_masks(sliding_window, causal_mask)


def generate_prefix_lm_mask(prefix_length: int):
    """attn_gym/masks/prefix_lm.py: the prefix seen by every query, the rest causally."""
    def prefix_mask(b, h, q_idx, kv_idx):
        return kv_idx < prefix_length
    return masks.or_masks(prefix_mask, causal_mask)


def generate_doc_mask(document_id):
    """attn_gym/masks/document_mask.py with the causal inner mask: same document and causal. (Within one document
    q_idx - offset >= kv_idx - offset is q_idx >= kv_idx, so the logical positions need no offsets.) The ids are
    run-time data: symattn.masks.document(ids)."""
    return masks.and_masks(masks.document(document_id), causal_mask)


def generate_dilated_sliding_window(window_size: int, dilation: int):
    """attn_gym/masks/dilated_sliding_window.py: |i - j| within the window and a multiple of the dilation
    (torch.abs -> ops.abs; == on symbols compares expressions, so (diff % dilation) == 0 -> ops.eq)."""
    def dilated_sliding_window(b, h, q_idx, kv_idx):
        diff = ops.abs(q_idx - kv_idx)
        in_window = diff <= window_size
        is_dilated = ops.eq(diff % dilation, 0)
        return in_window & is_dilated
    return dilated_sliding_window


def generate_natten(canvas_w: int, canvas_h: int, kernel_w: int, kernel_h: int):
    """attn_gym/masks/natten.py: a 2-D neighbourhood on a canvas flattened row by row (idx // canvas_w,
    idx % canvas_w), the kernel's centre clamped inside the canvas (tensor.clamp -> ops.minimum/ops.maximum)."""
    def get_x_y(idx):
        return idx // canvas_w, idx % canvas_w

    def natten_mask_mod(b, h, q_idx, kv_idx):
        q_x, q_y = get_x_y(q_idx)
        kv_x, kv_y = get_x_y(kv_idx)
        kernel_center_x = ops.minimum(ops.maximum(q_x, kernel_w // 2), (canvas_w - 1) - kernel_w // 2)
        kernel_center_y = ops.minimum(ops.maximum(q_y, kernel_h // 2), (canvas_h - 1) - kernel_h // 2)
        hori_mask = ops.abs(kernel_center_x - kv_x) <= kernel_w // 2
        vert_mask = ops.abs(kernel_center_y - kv_y) <= kernel_h // 2
        return hori_mask & vert_mask
    return natten_mask_mod


def examples() -> list[Example]:
    """The gallery; the document mask is included where symattn.masks.document exists."""
    out = [
        Example("alibi", "attn_gym/mods/alibi.py", lambda: dict(score_mod=score_mod(generate_alibi_bias(8)),
                                                                   mask=causal_mask)),
        Example("softcap", "attn_gym/mods/softcapping.py", lambda: dict(score_mod=score_mod(generate_tanh_softcap(2)))),
        Example("sliding_window", "attn_gym/masks/sliding_window.py", lambda: dict(mask=generate_sliding_window(1))),
        Example("prefix_lm", "attn_gym/masks/prefix_lm.py", lambda: dict(mask=generate_prefix_lm_mask(1))),
        Example("dilated_sliding_window", "attn_gym/masks/dilated_sliding_window.py",
                lambda: dict(mask=generate_dilated_sliding_window(2, 2)), n=4),
        Example("natten", "attn_gym/masks/natten.py", lambda: dict(mask=generate_natten(2, 3, 1, 3)), n=6),
        Example("relative_positional", "FlexAttention blog", lambda: dict(score_mod=score_mod(relative_positional))),
        Example("learned_bias", "FlexAttention blog", lambda: dict(score_mod=score_mod(generate_learned_bias(N)),
                                                                   mask=causal_mask)),
    ]
    if hasattr(masks, "document"):
        out.append(Example("document", "attn_gym/masks/document_mask.py",
                           lambda: dict(mask=generate_doc_mask([0, 0, 1]))))
    return out


def verify_gallery(*, seed: int = 0, progress: Progress = silent) -> dict:
    """{example name: VerifyReport} for every example of the gallery."""
    from .verification import verify
    reports = {}
    for example in examples():
        progress(f"gallery: {example.name} ({example.source})")
        reports[example.name] = verify(example.spec(), seed=seed, progress=progress)
    return reports
