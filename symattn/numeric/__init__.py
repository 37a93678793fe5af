"""Numbers with PyTorch SDPA semantics on the generated kernels; never imports SymPy.

api: attention, attention_backward, attention_weights; layer: the multi-head layer; kernels: dispatch and the
unrolled-kernel cache; reference: the plain NumPy oracle; attention_loops: the generated loop kernels."""
