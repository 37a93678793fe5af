"""Checking the generated kernels: four-way verification and finite differences."""
