"""Thin command-line programs over the public API (python -m pprt.generate, python -m pprt.plan)."""
