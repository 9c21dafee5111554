"""The driver side: the LLM's request loop, the scheduler and the block manager (ids, never model tensors)."""
