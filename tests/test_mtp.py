"""Speculative decoding with the checkpoint's own MTP head (`mtp.*`), on the last stage of the pipeline.

1. The head's draft logits equal the published formula (tests/mtp_reference.py, plain torch:
   transformers ignores mtp.*), after a prefill cut in two chunks and after a verify step
   that accepted two of three drafts, for a dense multimodal Qwen3.5, a Qwen3.5-MoE with
   fused experts and a Qwen3-Next with per-expert tensors.
2. Greedy output with MTP drafting equals transformers' (and so the output without
   drafting), on 1, 2 and 3 stages, with preemption in a tiny KV pool; on the way, every
   draft the head proposed equals the formula's for the tokens it followed (also after
   prefix-cache hits). A random head accepts little, so some runs also replace the head's
   drafts by transformers' continuation with one token spoiled: every acceptance count
   0..k happens, and the head's KV after accepted drafts is checked the same way.
3. Seeded sampling: a request's tokens do not depend on its batch neighbours; over many
   unseeded runs the token frequencies with MTP drafting equal those without (a
   checkpoint whose head and model both tend to repeat the last token: drafts accepted
   and rejected), within 4.5 standard errors.
4. A checkpoint without an MTP head is refused by name; the planner counts the head, its
   KV and the embedding copy.
"""

from __future__ import annotations

import pytest
import torch

from models import make_checkpoint, reference_greedy, reference_model, spoiled_continuation
from mtp_reference import load_head, reference_drafts
from pprt import LLM, SamplingParams
from pprt.distributed.step import NewSequence, PoolSizes, SeqChunk, StepPlan
from pprt.distributed.worker import Worker, WorkerSpec
from pprt.errors import CheckpointError
from pprt.weights.checkpoint import ModelSource, load_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

K = 3
N = 16
GREEDY = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
MTP = {"method": "mtp", "num_speculative_tokens": K}
PROMPTS = [[5, 17, 40, 33, 5, 17, 40, 33, 5, 17], [9, 8], [30, 31, 32, 33, 34, 35, 30, 31, 32, 33, 34],
           [5, 17, 40, 33, 5, 17, 40, 33, 9]]  # the last shares two 4-token blocks with the first
FAMILIES = {"qwen3_5": {}, "qwen3_5_moe": {}, "qwen3_next": {"mtp": True}, "qwen3_5_text": {"mtp": True}}


@pytest.fixture(scope="module")
def oracles(tmp_path_factory):
    """Per family: a checkpoint with an MTP head, its transformers model and head tensors, and
    transformers' greedy continuations of PROMPTS (built once)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            path = make_checkpoint(tmp_path_factory.mktemp(family), family, **FAMILIES[family])
            model = reference_model(path)
            expected = {tuple(p): reference_greedy(model, p, N)[0] for p in PROMPTS}
            cache[family] = path, model, load_head(path, model), expected
        return cache[family]

    return get


# ---- 1. the head against the formula, one stage driven step by step -------------------------------

class _Logits:
    """Records what the stage's head returns (the model's rows, then each draft step's)."""

    def __init__(self, stage):
        self.calls, self._head = [], stage.logits

    def __call__(self, x):
        self.calls.append(self._head(x))
        return self.calls[-1]


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe", "qwen3_next"])
def test_draft_logits_equal_the_published_formula(oracles, family):
    path, model, head, expected = oracles(family)
    config = load_config(ModelSource(path))
    worker = Worker(WorkerSpec(str(path), config, (0, config.num_layers), "cpu", torch.float32, block_size=4,
                               max_context=64, mtp=True))
    worker.allocate_cache(PoolSizes(blocks=8, slots=2 if config.hybrid else 0))
    recorder = worker.stage.logits = _Logits(worker.stage)
    slot = dict(state_slot=0) if config.hybrid else {}
    prompt = PROMPTS[2][:7]
    params = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True).resolve()
    # a prefill cut in two: the first chunk carries the token after it
    first = SeqChunk(0, prompt[:4], 0, blocks_from=0, new_blocks=[0, 1, 2, 3], sample=False, next_token=prompt[4],
                     **slot)
    worker.execute(StepPlan(0, [first], [NewSequence(0, params, prompt)]))
    assert recorder.calls == [] or all(c.shape[0] == 0 for c in recorder.calls)
    last = SeqChunk(0, prompt[4:], 4, blocks_from=4, new_blocks=[], sample=True, propose=K, **slot)
    recorder.calls.clear()
    result = worker.execute(StepPlan(1, [last]))
    tokens = prompt + result.token_ids
    drafts, logits = reference_drafts(model, head, tokens, K)
    assert len(recorder.calls) == 1 + K and all(c.shape[0] == 1 for c in recorder.calls)
    torch.testing.assert_close(torch.cat(recorder.calls[1:]), logits, rtol=1e-4, atol=1e-4)
    assert result.drafts == [drafts]
    # verify: transformers' next three tokens with the third spoiled, so two are accepted
    sent = reference_greedy(model, tokens, K)[0]
    sent[2] = (sent[2] + 1) % 320
    spec = dict(state_slot=0, snapshot_slot=1) if config.hybrid else {}
    verify = SeqChunk(0, tokens[-1:] + sent, len(prompt), blocks_from=4, new_blocks=[], sample=True,
                      num_drafts=K, propose=K, **spec)
    recorder.calls.clear()
    result = worker.execute(StepPlan(2, [verify]))
    assert result.accepted == [sent[:2]]
    tokens += sent[:2] + result.token_ids
    drafts, logits = reference_drafts(model, head, tokens, K)
    assert recorder.calls[0].shape[0] == K + 1 and len(recorder.calls) == 1 + K
    torch.testing.assert_close(torch.cat(recorder.calls[1:]), logits, rtol=1e-4, atol=1e-4)
    assert result.drafts == [drafts]


# ---- 2. greedy generation through the pipeline ------------------------------------------------------

def watch_drafts(monkeypatch, expected: dict | None = None) -> list:
    """Record (tokens, drafts) each time a sequence receives the head's drafts; with `expected`,
    then replace them by transformers' spoiled continuation (what the next chunk sends)."""
    from pprt.engine.scheduler import Scheduler

    seen, complete = [], Scheduler.complete

    def watched(self, plan, result, seqs):
        updated = complete(self, plan, result, seqs)
        for seq, _ in updated:
            if seq.drafts:
                seen.append((seq.tokens, list(seq.drafts)))
            if expected is not None and seq.drafts_at == seq.num_tokens:
                seq.drafts = spoiled_continuation(expected, seq.tokens, K)
        return updated

    monkeypatch.setattr(Scheduler, "complete", watched)
    return seen


def check_greedy(family, oracles, monkeypatch, oracle_drafts=False, formula=True, **llm_kw):
    """Greedy tokens with MTP drafting equal transformers' (the batch, then PROMPTS[0] again, from
    the prefix cache); the drafts the head proposed equal the formula's (`formula`: every other
    one). Returns the LLM's stats."""
    path, model, head, expected = oracles(family)
    seen = watch_drafts(monkeypatch, expected if oracle_drafts else None)
    with LLM(str(path), speculative=MTP, **llm_kw) as llm:
        outs = llm.generate(PROMPTS, GREEDY)
        again = llm.generate(PROMPTS[0], GREEDY)[0]  # its prompt's blocks are cached now
        stats = llm.stats()
        assert stats.kv_blocks_used == 0 and stats.state_slots_used == 0  # every block and slot came back
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.token_ids == expected[tuple(prompt)], prompt
    assert again.token_ids == expected[tuple(PROMPTS[0])]
    assert stats.draft_tokens > 0 and stats.accepted_tokens <= stats.draft_tokens
    if oracle_drafts:  # both paths ran: drafts accepted (KV kept) and rejected (KV dropped, state rolled back)
        assert 0 < stats.accepted_tokens < stats.draft_tokens, stats
    assert len(seen) >= len(PROMPTS) * 2
    if formula:  # every other record (each costs a transformers forward)
        for tokens, drafts in seen[::2]:
            assert drafts == reference_drafts(model, head, tokens, len(drafts))[0], tokens
    return stats


@pytest.mark.parametrize("family, devices, split, chunk_size, oracle_drafts", [
    ("qwen3_5", ["cpu"], None, 2048, False),
    ("qwen3_5", ["cpu"], None, 5, True),
    ("qwen3_next", ["cpu", "cpu"], [5, 3], 5, True),
    ("qwen3_5_text", ["cpu"] * 3, [2, 3, 3], 7, False),
    pytest.param("qwen3_5_moe", ["cpu", "cpu"], [3, 5], 6, True, marks=pytest.mark.slow),
    pytest.param("qwen3_next", ["cpu"] * 3, [3, 2, 3], 7, True, marks=pytest.mark.slow),
    pytest.param("qwen3_5_moe", ["cpu"] * 3, [2, 4, 2], 2048, False, marks=pytest.mark.slow),
], ids=["qwen3_5-1stage", "qwen3_5-1stage-chunked-oracle", "qwen3_next-2stages-chunked-oracle",
        "qwen3_5_text-3stages-chunked", "qwen3_5_moe-2stages-chunked-oracle", "qwen3_next-3stages-oracle",
        "qwen3_5_moe-3stages"])
def test_greedy_with_mtp_equals_transformers(oracles, monkeypatch, family, devices, split, chunk_size,
                                             oracle_drafts):
    check_greedy(family, oracles, monkeypatch, oracle_drafts, devices=devices, split=split, chunk_size=chunk_size,
                 block_size=4)


@pytest.mark.parametrize("family", ["qwen3_5_text", pytest.param("qwen3_next", marks=pytest.mark.slow),
                                    pytest.param("qwen3_5_moe", marks=pytest.mark.slow)])
def test_greedy_with_mtp_under_preemption(oracles, monkeypatch, family):
    """A pool of 14 blocks of 4 tokens for 4 sequences of up to 26 tokens (and the head's draft
    positions): sequences are preempted and recomputed, their head's KV with them."""
    path = oracles(family)[0]
    with LLM(str(path), devices=["cpu"], block_size=4, speculative=MTP) as llm:
        per_block = llm.executor.worker.cache.spec.bytes_per_block
    stats = check_greedy(family, oracles, monkeypatch, oracle_drafts=True, devices=["cpu"], block_size=4,
                         kv_cache_memory=14 * per_block)
    assert stats.preemptions > 0


# ---- 3. sampling -------------------------------------------------------------------------------------

@pytest.mark.parametrize("oracle_drafts", [False, True], ids=["head-drafts", "oracle-drafts"])
def test_seeded_sampling_does_not_depend_on_neighbours(oracles, monkeypatch, oracle_drafts):
    path, _, _, expected = oracles("qwen3_5")
    watch_drafts(monkeypatch, expected if oracle_drafts else None)
    # a low temperature: the oracle's greedy drafts are mostly accepted (spoiled ones rejected)
    params = SamplingParams(max_tokens=N, temperature=0.05 if oracle_drafts else 0.8, seed=11, ignore_eos=True)
    with LLM(str(path), devices=["cpu"], speculative=MTP) as llm:
        alone = llm.generate(PROMPTS[0], params)[0]
        batch = llm.generate(PROMPTS, params)
        stats = llm.stats()
    assert batch[0].token_ids == alone.token_ids
    assert stats.draft_tokens > 0
    if oracle_drafts:
        assert 0 < stats.accepted_tokens < stats.draft_tokens


def repeating_checkpoint(path):
    """A tied qwen3_5_text checkpoint whose model tends to repeat its last token and whose MTP
    head drafts exactly that (a stand-in for a trained pair: drafts often accepted, not always):
    larger embeddings, decoder and head layers scaled down to a trickle, the head's fc passing
    the embedding half through and its norms at 1."""
    from safetensors.torch import load_file, save_file

    path = make_checkpoint(path, "qwen3_5_text", mtp=True, tie_word_embeddings=True)
    gen = torch.Generator().manual_seed(3)
    for shard in path.glob("*.safetensors"):
        tensors = load_file(shard)
        for name, t in tensors.items():
            if name == "model.embed_tokens.weight":
                tensors[name] = 0.12 * torch.randn(t.shape, generator=gen)
            elif name == "mtp.fc.weight":  # [H, 2H]: [identity | 0]
                tensors[name] = torch.cat([torch.eye(t.shape[0]), torch.zeros(t.shape[0], t.shape[0])], dim=1)
            elif name.startswith("mtp.") and "norm" in name and "layers" not in name:
                tensors[name] = torch.zeros_like(t)
            elif ".layers." in name and "norm" not in name and t.dim() == 2:
                tensors[name] = 0.05 * t
        save_file(tensors, shard, metadata={"format": "pt"})
    return path


def test_sampled_tokens_follow_the_same_distribution_with_mtp(tmp_path):
    """B unseeded samples at temperature 1.3 with and without MTP drafting (fixed LLM seeds: the test
    is deterministic), 50 requests at a time (a hybrid sequence drafts only while no request waits
    for a state slot): every token's frequency at output positions 1-3 agrees within 4.5 standard
    errors of the difference of two binomial frequencies."""
    path = repeating_checkpoint(tmp_path / "repeating")
    B, n = 400, 4
    params = SamplingParams(max_tokens=n, temperature=1.3, top_p=1.0, top_k=0, min_p=0.0, ignore_eos=True)
    runs = {}
    for spec in (None, MTP):
        with LLM(str(path), devices=["cpu"], seed=5, speculative=spec) as llm:
            runs[spec is None] = torch.tensor([o.token_ids for _ in range(B // 50)
                                               for o in llm.generate([[7, 100, 250, 31]] * 50, params)])
            stats = llm.stats()
    assert stats.draft_tokens > B and 0.1 < stats.acceptance_rate < 0.9, stats
    print(f"MTP drafts: {stats.draft_tokens}, accepted {stats.acceptance_rate:.2f}")
    base, spec = runs[True], runs[False]  # [B, n] each
    for pos in range(1, n):
        V = int(max(base[:, pos].max(), spec[:, pos].max())) + 1
        fb, fs = (torch.bincount(x[:, pos], minlength=V).float() / B for x in (base, spec))
        pooled = (fb + fs) / 2
        tol = 4.5 * (pooled * (1 - pooled) * 2 / B).sqrt() + 1e-3
        assert ((fb - fs).abs() <= tol).all(), (pos, (fb - fs).abs().max())


# ---- 4. refusal, what is read, what is planned -------------------------------------------------------

def test_a_checkpoint_without_an_mtp_head_is_refused_by_name(tmp_path, oracles):
    """Qwen3-Next's config.json declares no MTP layer though its files hold one (the head is then
    found by its tensors: the other tests run it); a Qwen3.5 export declaring none and holding
    none is refused, and so is a head with tensors missing, naming them."""
    import json

    assert load_config(ModelSource(oracles("qwen3_next")[0])).mtp_num_layers == 0
    plain = make_checkpoint(tmp_path / "plain", "qwen3_5_text")  # config.json declares no MTP layer
    with pytest.raises(CheckpointError, match="no multi-token-prediction.*mtp_num_hidden_layers"):
        LLM(str(plain), devices=["cpu"], speculative=MTP)
    broken = make_checkpoint(tmp_path / "broken", "qwen3_5")
    index_path = broken / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["mtp.layers.0.self_attn.k_proj.weight"], index["weight_map"]["mtp.fc.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"lacks 2 of its \d+ tensors.*mtp\.fc\.weight.*k_proj"):
        LLM(str(broken), devices=["cpu"], speculative=MTP)


def test_the_last_stage_reads_the_head_and_the_embedding_once(tmp_path, monkeypatch):
    """Bytes read per stage with MTP on (a fused-expert Qwen3.5-MoE on two stages): the first reads
    no mtp.* tensor, the last reads every one of them whole, and the embedding too."""
    from test_hybrid_weights import ReadSpy, tensor_ranges

    from pprt.models.stage import Stage
    from pprt.weights.checkpoint import CheckpointReader
    from pprt.weights.loader import load_stage

    path = make_checkpoint(tmp_path / "m", "qwen3_5_moe", tokenizer=False)
    ranges = tensor_ranges(path)
    config = load_config(ModelSource(path))
    reads = []
    for layers in ((0, 5), (5, config.num_layers)):
        stage = Stage(config, layers, mtp=True)
        spy = ReadSpy(monkeypatch)
        load_stage(stage, CheckpointReader(ModelSource(path)), torch.device("cpu"), torch.float32, progress=False)
        monkeypatch.undo()
        reads.append(spy.tensors(ranges))
        assert sum(reads[-1].values()) == sum(p.numel() * 4 for p in stage.parameters())
    first, last = reads
    mtp = {n: b - a for (_, n), (a, b) in ranges.items() if n.startswith("mtp.")}
    assert not [n for n in first if n.startswith("mtp.")]
    assert {n: b for n, b in last.items() if n.startswith("mtp.")} == mtp
    embedding = "model.language_model.embed_tokens.weight"
    assert first[embedding] == last[embedding] == config.vocab_size * config.hidden_size * 4


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_the_planner_counts_the_head_its_kv_and_the_embedding(tmp_path, family):
    from pprt.models.stage import Stage
    from pprt.plan import DeviceBudget, GiB, embedding_bytes, kv_bytes_per_token, mtp_weight_bytes, plan
    from pprt.weights.checkpoint import CheckpointReader
    from pprt.weights.loader import load_stage

    path = make_checkpoint(tmp_path / "m", family, tokenizer=False)
    config = load_config(ModelSource(path))
    stage = Stage(config, (4, config.num_layers), mtp=True)
    load_stage(stage, CheckpointReader(ModelSource(path)), torch.device("cpu"), torch.float32, progress=False)
    held = sum(t.nbytes for n, t in stage.state_dict().items() if n.startswith("mtp."))
    assert mtp_weight_bytes(config, dtype_bytes=4) == held  # exact, experts stacked as loaded
    budgets = [DeviceBudget("a", GiB), DeviceBudget("b", GiB)]
    off, on = (plan(config, budgets, dtype_bytes=4, split=[4, 4], max_context=256, mtp_tokens=k) for k in (0, 2))
    assert on.stages[0] == off.stages[0]
    assert on.stages[1].weight_bytes - off.stages[1].weight_bytes == held + embedding_bytes(config, 4)
    assert on.stages[1].kv_bytes_per_token - off.stages[1].kv_bytes_per_token == kv_bytes_per_token(config, 1, "auto", 4)
    assert on.stages[1].weight_bytes == sum(t.nbytes for t in stage.state_dict().values())


def test_cli_drafts_with_the_mtp_head(oracles, capsys):
    import json

    from pprt.entrypoints import generate as cli

    path = str(oracles("qwen3_5")[0])
    with LLM(path, devices=["cpu"]) as llm:
        expected = llm.generate("hello world", SamplingParams(max_tokens=12, temperature=0))[0]
    argv = ["--model", path, "--devices", "cpu", "--prompt", "hello world", "--temperature", "0",
            "--max-new-tokens", "12", "--speculative-mtp", "2", "--json"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == expected.token_ids
    assert out["statistics"]["speculative"]["draft_tokens"] > 0
    for bad, text in ((["--speculative-mtp", "0"], "--speculative-mtp must be in 1..16"),
                      (["--speculative-mtp", "2", "--speculative-ngram", "2"], "two ways to draft")):
        with pytest.raises(SystemExit) as e:
            cli.main(["--model", "/nonexistent/never/loaded", *bad])
        assert e.value.code == 2 and text in capsys.readouterr().err
