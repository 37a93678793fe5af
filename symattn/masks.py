"""`symattn.masks`: the masks (causal, sliding_window, prefix_lm, document, key_padding, and_masks, or_masks), importable as `from symattn.masks import ...`.

The module is symattn.symbolic.masks itself (one object under two names), so its classes and registries are shared."""
import sys

from .symbolic import masks as _module

sys.modules[__name__] = _module
