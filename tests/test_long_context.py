"""Long context: YaRN against transformers, an 8k prompt through chunked prefill,
YaRN switched on by max_context, refusals, and a whole generation through the
Triton kernels under the interpreter.

Everything runs in fp32, so pprt and transformers agree to rounding: greedy
tokens must be identical and the chosen tokens' logprobs within LOGPROB_ATOL.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from models import make_checkpoint, reference_greedy, reference_model
from pprt import LLM, SamplingParams
from pprt.models.layers import rope_inv_freq
from pprt import RequestTooLarge

LOGPROB_ATOL = 1e-4  # fp32 end to end; measured <= 2e-5 on these models


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 320, (n,), generator=g).tolist()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0)


def chosen_logprobs(out) -> torch.Tensor:
    return torch.tensor([lp[t] for lp, t in zip(out.logprobs, out.token_ids)])


def test_yarn_checkpoint_past_its_original_window_matches_transformers(tmp_path):
    """qwen3 (head_dim 24) with YaRN, original window 32, factor 4: prompts of 3-4x that window."""
    path = make_checkpoint(tmp_path, "qwen3", yarn={"factor": 4.0, "original_max_position_embeddings": 32},
                           max_position_embeddings=128, tokenizer=False)
    ref = reference_model(path)
    prompts = [tokens(97, 1), tokens(115, 2)]
    with LLM(str(path), devices=["cpu"], chunk_size=40) as llm:
        rope = llm.config.rope
        assert (rope.type, rope.factor, rope.original_max_position) == ("yarn", 4.0, 32)  # used as is
        outs = llm.generate(prompts, greedy(10))
    for prompt, out in zip(prompts, outs):
        want, want_lp = reference_greedy(ref, prompt, 10)
        assert out.token_ids == want
        assert torch.allclose(chosen_logprobs(out), torch.tensor(want_lp), atol=LOGPROB_ATOL, rtol=0)


def test_8k_prompt_through_chunked_prefill_matches_transformers(tmp_path):
    """8200 tokens in chunks of 1024 (the last one ragged), then decode; the tail's logprobs match."""
    path = make_checkpoint(tmp_path, "qwen2", yarn={"factor": 4.0, "original_max_position_embeddings": 4096},
                           max_position_embeddings=16384, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, tokenizer=False)
    prompt, n = tokens(8200, 3), 4
    with LLM(str(path), devices=["cpu"], chunk_size=1024, max_context=8300) as llm:
        out = llm.generate(prompt, greedy(n))[0]
    with torch.inference_mode():  # one transformers pass over prompt + generated tokens
        logits = reference_model(path)(torch.tensor([prompt + out.token_ids[:-1]])).logits[0, -n:]
    logp = torch.log_softmax(logits.float(), dim=-1)  # [n, V]: the distributions of the generated tokens
    assert out.token_ids == logp.argmax(-1).tolist()
    want = logp[torch.arange(n), torch.tensor(out.token_ids)]
    assert torch.allclose(chosen_logprobs(out), want, atol=LOGPROB_ATOL, rtol=0)


@pytest.mark.parametrize("how", ["max_context", "rope_scaling"])
def test_yarn_from_max_context_or_the_user_is_what_transformers_computes(tmp_path, caplog, how):
    """No rope scaling, window 64: max_context 256 enables YaRN factor 4 over original 64, and so does
    LLM(rope_scaling=...) with those numbers: exactly the rope (and outputs) of a transformers model
    whose config.json carries that yarn block."""
    plain = make_checkpoint(tmp_path / "plain", "qwen2", max_position_embeddings=64, tokenizer=False)
    yarn = tmp_path / "yarn"
    shutil.copytree(plain, yarn)
    cfg = json.loads((yarn / "config.json").read_text())
    cfg.update(max_position_embeddings=256,
               rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    (yarn / "config.json").write_text(json.dumps(cfg))
    ref = reference_model(yarn)

    prompt = tokens(150, 4)
    kwargs = {"max_context": 256} if how == "max_context" else {
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}
    with caplog.at_level(logging.WARNING, logger="pprt"):
        with LLM(str(plain), devices=["cpu"], **kwargs) as llm:
            out = llm.generate(prompt, greedy(8))[0]
            config, max_context = llm.config, llm.max_context
    if how == "max_context":
        assert any("enabling YaRN (factor 4, original 64)" in r.getMessage() for r in caplog.records)
    assert max_context == 256
    assert (config.rope.type, config.rope.factor, config.rope.original_max_position) == ("yarn", 4.0, 64)
    inv_freq, scale = rope_inv_freq(config.rope, config.head_dim)
    assert torch.allclose(inv_freq, ref.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    assert scale == pytest.approx(ref.model.rotary_emb.attention_scaling, rel=1e-7)
    assert scale != 1.0 and not torch.equal(inv_freq, 1 / 10000 ** (torch.arange(0, 16, 2) / 16))  # really YaRN
    want, want_lp = reference_greedy(ref, prompt, 8)
    assert out.token_ids == want
    assert torch.allclose(chosen_logprobs(out), torch.tensor(want_lp), atol=LOGPROB_ATOL, rtol=0)


def test_too_long_requests_are_refused_up_front_with_the_numbers(tmp_path):
    path = make_checkpoint(tmp_path, "qwen2", max_position_embeddings=64, tokenizer=False)
    block_bytes = 2 * 3 * 16 * 2 * 16 * 4  # layers 3, block 16, kv heads 2, head_dim 16, fp32
    with LLM(str(path), devices=["cpu"], max_context=100, kv_cache_memory=5 * block_bytes) as llm:
        with pytest.raises(RequestTooLarge, match=r"prompt of 100 tokens .* max_context 100: at most 99 prompt"):
            llm.generate(tokens(100, 5), greedy(1))
        with pytest.raises(RequestTooLarge, match=r"needs KV for 89 tokens .* pool holds 80 tokens \(5 blocks of 16\)"):
            llm.generate(tokens(60, 6), greedy(30))
        assert llm.blocks.num_free == 5 and not llm.scheduler.has_work  # nothing was admitted
        assert len(llm.generate(tokens(60, 6), greedy(20))[0].token_ids) == 20  # 79 tokens of KV fit


TRITON_RUN = textwrap.dedent("""
    import json, sys
    import pprt_kernels.paged_attention as pa
    from pprt import LLM, SamplingParams

    calls = {"decode": 0, "prefill": 0, "fp8": 0}
    triton_fn = pa.paged_attention_triton

    def counted(*args, **kwargs):
        calls["decode" if kwargs["max_query_len"] == 1 else "prefill"] += 1
        calls["fp8"] += kwargs["k_scale"] is not None
        return triton_fn(*args, **kwargs)

    pa.paged_attention_triton = counted
    path, prompts, chunk, n, kv_dtypes = json.loads(sys.argv[1])
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0)
    runs = {}
    for kv in kv_dtypes:
        with LLM(path, devices=["cpu"], dtype="float32", chunk_size=chunk, kv_dtype=kv) as llm:
            outs = llm.generate(prompts, params)
        runs[kv] = {"tokens": [o.token_ids for o in outs],
                    "logprobs": [[lp[t] for lp, t in zip(o.logprobs, o.token_ids)] for o in outs]}
    print(json.dumps({"calls": calls, "runs": runs}))
""")


def run_with_triton_interpreter(path, prompts, chunk: int, n: int, kv_dtypes: list[str]) -> dict:
    """Generate in a fresh process with PPRT_KERNELS=triton TRITON_INTERPRET=1 (read at import)."""
    env = dict(os.environ, PPRT_KERNELS="triton", TRITON_INTERPRET="1")
    args = json.dumps([str(path), prompts, chunk, n, kv_dtypes])
    proc = subprocess.run([sys.executable, "-c", TRITON_RUN, args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_generation_through_triton_kernels_under_interpreter_matches_reference(tmp_path):
    """Prefill chunks that start mid-block, mixed prefill + decode steps, then pure decode (GQA 2),
    with the model's fp32 cache and with an fp8 cache (scales read by the kernels)."""
    path = make_checkpoint(tmp_path, "qwen2", num_hidden_layers=2, tokenizer=False)
    prompts, chunk, n = [tokens(58, 7), tokens(5, 8), tokens(37, 9)], 27, 5
    got = run_with_triton_interpreter(path, prompts, chunk, n, ["auto", "fp8"])
    calls = got["calls"]
    assert calls["prefill"] > 0 and calls["decode"] > 0 and 0 < calls["fp8"] < calls["prefill"] + calls["decode"]
    for kv, run in got["runs"].items():
        with LLM(str(path), devices=["cpu"], chunk_size=chunk, kv_dtype=kv) as llm:  # the torch reference
            want = llm.generate(prompts, greedy(n))
        assert run["tokens"] == [o.token_ids for o in want], kv
        for lp, o in zip(run["logprobs"], want):
            assert torch.allclose(torch.tensor(lp), chosen_logprobs(o), atol=LOGPROB_ATOL, rtol=0), kv
