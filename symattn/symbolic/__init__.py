"""What attention is computed, symbolically: the spec, tensors (explicit and indexed), the score, the ordered
derivation of a head and of a multi-head layer, and the proofs against plain differentiation."""
