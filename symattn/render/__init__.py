"""Printing a derivation (text, LaTeX, Markdown, standalone .tex); never recomputes."""
