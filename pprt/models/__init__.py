"""What runs on a stage: plain torch modules over a layer range, its KV pool and its sampler.

No ranks, no processes: imports nothing from pprt.engine or pprt.distributed.
"""
