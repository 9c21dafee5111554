"""fp8 (e4m3) KV cache: layout and bytes, and logprobs end to end on CPU.

The fp8 pool stores codes plus one float32 scale per (slot, kv head) for K and
V, so a token costs (head_dim + 4) bytes per kv head instead of 2 * head_dim in
bf16. e4m3 keeps 3 mantissa bits (bf16: 7), so fp8 errors are ~16x bf16's.

Measured on these tiny fp32 models (greedy steps compared while the contexts
still agree; top-5 logprobs of every step), |logprob - logprob(fp32 cache)|:
    qwen2  fp8 max 0.034 mean 0.010   bf16 max 0.0037 mean 0.0010
    qwen3  fp8 max 0.085 mean 0.019   bf16 max 0.0052 mean 0.0013
The tolerances below leave ~2x margin over those.
"""

import pytest
import torch

from models import make_checkpoint
from pprt import LLM, SamplingParams
from pprt.models.kv import CacheSpec, KVCache
from pprt.config import ModelConfig
from pprt.plan import kv_bytes_per_token

FP8 = torch.float8_e4m3fn
FP8_MAX_ABS, FP8_MEAN_ABS = 0.15, 0.04  # logprob tolerances against the fp32 cache
BF16_MAX_ABS = 0.015


def test_fp8_pool_layout_bytes_and_planner_agree():
    """head_dim 128 (as Qwen2.5-72B): fp8 + scales is 132/256 of bf16; the planner counts the same."""
    geometry = dict(num_layers=3, num_kv_heads=2, head_dim=128, block_size=16)
    fp8, bf16 = CacheSpec(**geometry, dtype=FP8), CacheSpec(**geometry, dtype=torch.bfloat16)
    assert fp8.bytes_per_block * 256 == bf16.bytes_per_block * 132
    cache = KVCache(fp8, 7, "cpu")
    assert cache.k.dtype == cache.v.dtype == FP8
    assert cache.k_scale.shape == cache.v_scale.shape == (3, 7, 16, 2)
    assert cache.nbytes == 7 * fp8.bytes_per_block
    assert KVCache(bf16, 7, "cpu").nbytes == 7 * bf16.bytes_per_block
    layer = cache.layer(2)
    assert layer.k_scale.shape == (7, 16, 2) and layer.k_scale.is_contiguous()
    assert layer.k_scale.data_ptr() == cache.k_scale[2].data_ptr()  # views into the pool, not copies
    assert KVCache(bf16, 7, "cpu").layer(0).k_scale is None

    config = ModelConfig.from_dict(dict(model_type="qwen3", vocab_size=320, hidden_size=64, num_hidden_layers=5,
                                        num_attention_heads=6, num_key_value_heads=3, head_dim=40,
                                        intermediate_size=96))
    for kv, dtype in (("fp8", FP8), ("auto", torch.bfloat16)):
        spec = CacheSpec(config.num_layers, config.num_kv_heads, config.head_dim, 16, dtype)
        assert kv_bytes_per_token(config, config.num_layers, kv, 2) * 16 == spec.bytes_per_block, kv
    with pytest.raises(ValueError, match="dtype"):
        CacheSpec(**geometry, dtype=torch.int8)


PROMPTS = [[(7 * i + 3 * j) % 300 + 3 for i in range(n)] for j, n in enumerate([5, 61, 118])]


def run(path, kv: str) -> tuple[list, LLM]:
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=5)
    llm = LLM(str(path), devices=["cpu"], kv_dtype=kv, kv_cache_memory=2**20, chunk_size=64)
    return llm.generate(PROMPTS, params), llm


def logprob_errors(ref, other) -> torch.Tensor:
    """|difference| of the top-5 logprobs of every step while both runs saw the same context."""
    diffs = []
    for a, b in zip(ref, other):
        for la, lb, ta, tb in zip(a.logprobs, b.logprobs, a.token_ids, b.token_ids):
            diffs += [abs(la[t] - lb[t]) for t in la if t in lb]
            if ta != tb:
                break
    return torch.tensor(diffs)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_fp8_cache_logprobs_close_to_full_precision(tmp_path, family):
    path = make_checkpoint(tmp_path, family, tokenizer=False)
    full, _ = run(path, "auto")  # fp32 cache
    bf16, bf16_llm = run(path, "bf16")
    fp8, fp8_llm = run(path, "fp8")
    cache = fp8_llm.executor.worker.cache
    assert cache.k.dtype == FP8 and not torch.all(cache.k_scale == 1)  # scales were written
    # A block costs (h + 4) / 2h of bf16's, so the same 1 MiB budget holds 2h / (h + 4) times the tokens.
    h, bf16_block = cache.spec.head_dim, bf16_llm.executor.worker.cache_spec.bytes_per_block
    assert cache.spec.bytes_per_block * 2 * h == bf16_block * (h + 4)
    assert fp8_llm.executor.num_blocks == 2**20 // cache.spec.bytes_per_block
    assert fp8_llm.executor.num_blocks == pytest.approx(2 * h / (h + 4) * bf16_llm.executor.num_blocks, abs=2)
    assert cache.nbytes == fp8_llm.executor.num_blocks * cache.spec.bytes_per_block <= 2**20

    err_fp8, err_bf16 = logprob_errors(full, fp8), logprob_errors(full, bf16)
    assert len(err_fp8) >= 5 * len(PROMPTS)
    assert err_fp8.max() < FP8_MAX_ABS and err_fp8.mean() < FP8_MEAN_ABS
    assert err_bf16.max() < BF16_MAX_ABS
    assert err_fp8.max() > err_bf16.max()  # really quantized to fewer bits
    fp8_llm.close()
    bf16_llm.close()
