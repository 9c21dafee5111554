"""Finding and reading a checkpoint, and its weight formats (float, Int4, FP8).

Fills a `pprt.models` Stage; imports nothing from pprt.engine or pprt.distributed.
"""
