"""End-to-end benchmark: load, time to first token, prefill and decode rates, peak memory.

For a model directory (`--model`) or a random-weight checkpoint written from a
real config (`--config`: a preset, default Qwen2.5-7B geometry, or any
config.json; weights generated one tensor at a time and written shard by shard
in a temp dir, without a tokenizer: prompts are random token ids), it measures
every setup = (engine, weights, stages):

- engines: pprt (`pprt.LLM`) and transformers (`from_pretrained` with
  `device_map` over the same devices, the route most guides recommend; without
  accelerate a single device is reached with `.to(device)`), the comparison
  column `hf_tok_s` / `vs_hf` of every pprt row;
- weights: the model dtype (bf16 on GPU, fp32 on CPU) and Int4
  (`quant="int4"`; transformers through bitsandbytes when installed);
- stages: 1, and 2 on the same device(s) (on one GPU: both stages on cuda:0,
  activations through the host transport).

Rows (appended to results/generate.jsonl after each setup, so a run cut short
keeps what it measured):
- load: `load_s` (constructor wall time), `peak_mem_gb` per device over the
  whole setup (GPU: device memory in use above the baseline, sampled every
  10 ms, covering stage processes; CPU: peak RSS of the process or of each stage);
- prefill: one prompt of `prompt_len` tokens, 1 new token: `ttft_s` (wall time
  of generate) and `prefill_tok_s` = prompt_len / ttft_s;
- decode: `batch` prompts of `--decode-prompt` tokens; `decode_tok_s` =
  batch * N / (t(1 + N new tokens) - t(1 new token)), and against the memory
  roofline: `roofline_tok_s` = batch * copy bandwidth / (weight bytes read per
  step + KV bytes of the batch at its mean context), `frac_roofline` the ratio.
  Weight bytes read per step: every decoder layer (MoE: the expected share of
  experts a batch touches) and the head, in the format the runtime holds
  (pprt.plan's accounting); the embedding is a row lookup. The bandwidth is
  `harness.copy_bandwidth` on the first device, measured in the same run. With
  stages on distinct GPUs the roofline is the same: each stage reads its part
  once per micro-batch.
Every timing is the median over `--repeats` runs on fresh random prompts.

    python -m bench.generate                         # GPU: Qwen2.5-7B geometry, random weights
    python -m bench.generate --config qwen3.5-27b --layers 16   # a Qwen3.5-27B-shaped hybrid (first 16 layers)
    python -m bench.generate --model /path/to/Qwen2.5-7B-Instruct --stages 1
    python -m bench.generate --tiny --results-dir /tmp/r   # CPU, seconds (tests)
    python -m bench.generate --tiny --config tiny-qwen3.5  # CPU, a tiny Qwen3.5-27B-shaped hybrid

Hybrid models (Qwen3.5, Qwen3-Next): the decode roofline also counts each sequence's
recurrent state, read and written once per step by every DeltaNet layer.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.harness import append_results, copy_bandwidth, environment, print_table
from pprt import LLM, SamplingParams
from pprt.config import ModelConfig
from pprt.models.stage import Stage
from pprt.plan import (embedding_bytes, int4_linear_bytes, kv_bytes_per_token, layer_weight_bytes,
                       state_bytes_per_sequence)

GB = 1e9
# config.json of Qwen2.5-7B (QWEN.md section 5), the default geometry.
QWEN25_7B = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=152064, hidden_size=3584,
                 intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                 max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu",
                 tie_word_embeddings=False, use_sliding_window=False, bos_token_id=151643, eos_token_id=151643,
                 torch_dtype="bfloat16")
# A tiny qwen2 for the CPU test: 3 layers (split 2 + 1), odd vocabulary; every linear's
# input width a multiple of Int4's group size (128).
TINY = dict(QWEN25_7B, vocab_size=509, hidden_size=128, intermediate_size=384, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=0,
            eos_token_id=1, torch_dtype="float32")
# A text-only export of Qwen3.5-27B (QWEN.md section 7): 64 layers, 3 Gated DeltaNet + 1 gated
# full attention, dense MLP; vocab 248320.
QWEN35_27B = dict(architectures=["Qwen3_5ForCausalLM"], model_type="qwen3_5_text", vocab_size=248320,
                  hidden_size=5120, intermediate_size=17408, num_hidden_layers=64, num_attention_heads=24,
                  num_key_value_heads=4, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=48,
                  linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
                  full_attention_interval=4, attn_output_gate=True, max_position_embeddings=262144,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                                   "mrope_section": [11, 11, 10], "mrope_interleaved": True},
                  rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False, eos_token_id=248044,
                  torch_dtype="bfloat16")
# Its shape at tiny size for the CPU test: the same layer pattern (8 layers: split 5 + 3 cuts a
# group), value heads 3x key heads, hidden and intermediate multiples of 128.
TINY_QWEN35 = dict(QWEN35_27B, vocab_size=509, hidden_size=128, intermediate_size=384, num_hidden_layers=8,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, linear_num_key_heads=2,
                   linear_num_value_heads=6, linear_key_head_dim=32, linear_value_head_dim=32,
                   max_position_embeddings=1024, eos_token_id=1, torch_dtype="float32")
PRESETS = {"qwen2.5-7b": QWEN25_7B, "tiny": TINY, "qwen3.5-27b": QWEN35_27B, "tiny-qwen3.5": TINY_QWEN35}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True, slots=True)
class Workload:
    prompt_lens: tuple[int, ...]  # prefill: one prompt each
    batches: tuple[int, ...]  # decode batch sizes
    decode_prompt: int  # tokens of each decode prompt
    decode_tokens: int  # N: new tokens timed per decode measurement
    repeats: int

    def __post_init__(self):
        for name in ("prompt_lens", "batches"):
            if not getattr(self, name) or min(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a non-empty list of positive ints, got {getattr(self, name)}")
        for name in ("decode_prompt", "decode_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class Setup:
    engine: str  # "pprt" or "transformers"
    weights: str  # "bf16", "fp32", ... or "int4"
    devices: tuple[str, ...]  # one per stage
    transport: str = "auto"

    def __post_init__(self):
        if self.engine not in ("pprt", "transformers"):
            raise ValueError(f"engine {self.engine!r} is not pprt or transformers")

    @property
    def label(self) -> dict:
        return dict(engine=self.engine, weights=self.weights, stages=len(self.devices),
                    devices=",".join(self.devices))


# ---- a random-weight checkpoint -----------------------------------------------------------

def write_random_checkpoint(config: dict, path: Path, dtype: torch.dtype, init_device: str = "cpu",
                            shard_bytes: int = 2 << 30, seed: int = 0, std: float = 0.02) -> Path:
    """Write config.json and random weights (norms 1 -- 0 where a norm is zero-centred, x(1 + w)
    -- the rest N(0, std)) as safetensors shards of about `shard_bytes` with an index; tensor
    names and shapes are those pprt's Stage (and transformers) read. Host memory holds one
    shard at most."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(config, torch_dtype=str(dtype).removeprefix("torch."))
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    model_config = ModelConfig.from_dict(cfg)
    stage = Stage(model_config)  # meta tensors: names and shapes only
    gen = torch.Generator(init_device).manual_seed(seed)
    weight_map, shard, size, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, n
        n += 1
        name = f"model-{n:05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for name, meta in stage.named_parameters():
        if "norm" in name.rpartition(".")[0].rpartition(".")[2]:  # input/post/final/q/k norms
            centred = model_config.zero_centered_norm and not name.endswith("linear_attn.norm.weight")
            t = (torch.zeros if centred else torch.ones)(meta.shape, dtype=dtype)
        else:
            t = torch.empty(meta.shape, dtype=dtype, device=init_device).normal_(0, std, generator=gen).cpu()
        shard[name] = t
        size += t.nbytes
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    index = {"metadata": {"total_size": sum((path / f).stat().st_size for f in set(weight_map.values()))},
             "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return path


# ---- peak memory ----------------------------------------------------------------------------

class MemoryWatch:
    """Peak memory of a setup: device memory in use on each CUDA device (sampled in a thread,
    so stage processes count) and this process's peak RSS (reset at start where Linux allows)."""

    def __init__(self, devices: tuple[str, ...], period_s: float = 0.01):
        self.cuda = sorted({d for d in devices if torch.device(d).type == "cuda"})
        self.period_s = period_s
        self.peak = {d: 0 for d in self.cuda}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _used(self, d: str) -> int:
        free, total = torch.cuda.mem_get_info(torch.device(d))
        return total - free

    def _sample(self):
        while not self._stop.is_set():
            for d in self.cuda:
                self.peak[d] = max(self.peak[d], self._used(d) - self.base[d])
            self._stop.wait(self.period_s)

    def __enter__(self) -> MemoryWatch:
        self.rss_reset = _reset_peak_rss()
        self.base = {d: self._used(d) for d in self.cuda}
        for d in self.cuda:
            torch.cuda.reset_peak_memory_stats(torch.device(d))
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def result(self) -> dict[str, float]:
        """GB per device (and `process rss` / torch allocator peaks of this process)."""
        self._sample_once()
        out = {d: self.peak[d] / GB for d in self.cuda}
        out.update({f"{d} torch alloc": torch.cuda.max_memory_allocated(torch.device(d)) / GB for d in self.cuda})
        out["process rss" if self.rss_reset else "process rss (since start)"] = _peak_rss() / GB
        return out

    def _sample_once(self):
        for d in self.cuda:
            self.peak[d] = max(self.peak[d], self._used(d) - self.base[d])


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- the two engines behind one interface -----------------------------------------------------

class PprtRunner:
    def __init__(self, model: Path, setup: Setup, dtype: torch.dtype, max_context: int, kv_bytes: int,
                 chunk_size: int):
        self.llm = LLM(str(model), devices=list(setup.devices), dtype=dtype,
                       quant="int4" if setup.weights == "int4" else None, max_context=max_context,
                       kv_cache_memory=kv_bytes, transport=setup.transport, chunk_size=chunk_size, seed=0)

    def generate(self, prompts: list[list[int]], new_tokens: int) -> None:
        out = self.llm.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
        if any(len(c.token_ids) != new_tokens for c in out):
            raise RuntimeError(f"pprt returned {[len(c.token_ids) for c in out]} tokens, asked {new_tokens}")

    def weight_bytes(self) -> list[int]:
        ex = self.llm.executor
        return list(ex.weight_bytes) if hasattr(ex, "weight_bytes") else [ex.worker.weight_bytes()]

    def busy_seconds(self) -> list[float] | None:
        stats = getattr(self.llm.executor, "stats", None)
        return [s.busy_seconds for s in stats()] if stats else None

    def memory(self) -> dict[str, float]:
        stats = getattr(self.llm.executor, "stats", None)
        return {f"stage{s.stage} rss": s.peak_rss_bytes / GB for s in stats()} if stats else {}

    def close(self) -> None:
        self.llm.close()


class HFRunner:
    def __init__(self, model: Path, setup: Setup, dtype: torch.dtype, split: list[int] | None):
        import importlib.util

        from transformers import AutoModelForCausalLM

        kwargs = dict(dtype=dtype)
        if setup.weights == "int4":
            if torch.device(setup.devices[0]).type != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
                raise RuntimeError("transformers int4 needs bitsandbytes and CUDA (not available here)")
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)
        distinct = list(dict.fromkeys(setup.devices))
        self.device = torch.device(distinct[0])
        if importlib.util.find_spec("accelerate") is not None:
            one = len(distinct) == 1
            kwargs["device_map"] = distinct[0] if one else hf_device_map(model, setup.devices, split)
            self.model = AutoModelForCausalLM.from_pretrained(model, **kwargs).eval()
        elif len(distinct) == 1:
            self.model = AutoModelForCausalLM.from_pretrained(model, **kwargs).to(self.device).eval()
        else:
            raise RuntimeError("transformers across several devices needs accelerate (not installed)")

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], new_tokens: int) -> None:
        ids = torch.tensor(prompts, device=self.device)  # [B, P], equal lengths: no padding
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        if out.shape[1] - ids.shape[1] != new_tokens:
            raise RuntimeError(f"transformers returned {out.shape[1] - ids.shape[1]} tokens, asked {new_tokens}")

    def weight_bytes(self) -> list[int]:
        return [self.model.get_memory_footprint()]

    def busy_seconds(self) -> None:
        return None

    def memory(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        self.model = None


def hf_device_map(model: Path, devices: tuple[str, ...], split: list[int] | None) -> dict[str, str]:
    """Embedding and layers of stage i on devices[i] (pprt's split, else even), norm and head on the last."""
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    split = split or [layers // len(devices) + (i < layers % len(devices)) for i in range(len(devices))]
    owner = [d for d, n in zip(devices, split) for _ in range(n)]
    dmap = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0],
            "model.norm": devices[-1], "lm_head": devices[-1]}
    dmap.update({f"model.layers.{i}": d for i, d in enumerate(owner)})
    return dmap


# ---- measuring one setup ------------------------------------------------------------------------

class Prompts:
    """Fresh random token ids on every call, so no two timed runs share a prompt."""

    def __init__(self, vocab: int, seed: int = 0):
        self.gen, self.vocab = torch.Generator().manual_seed(seed), vocab

    def __call__(self, batch: int, length: int) -> list[list[int]]:
        return torch.randint(2, self.vocab, (batch, length), generator=self.gen).tolist()


def timed(runner, prompts: Prompts, batch: int, length: int, new_tokens: int) -> float:
    p = prompts(batch, length)
    t0 = time.perf_counter()
    runner.generate(p, new_tokens)
    return time.perf_counter() - t0


def decode_bytes(config: ModelConfig, weights: str, dtype_bytes: int, batch: int, context: float) -> float:
    """Bytes one decode step of `batch` sequences at mean `context` reads: layers, head, KV (full-attention
    layers), and for hybrid models each sequence's recurrent state, read and written."""
    quant = "int4" if weights == "int4" else "none"
    total = sum(layer_weight_bytes(config, i, quant, dtype_bytes) for i in range(config.num_layers))
    if config.num_experts:  # only the experts some token of the batch picks are read
        E, k, H, I = config.num_experts, config.num_experts_per_tok, config.hidden_size, config.moe_intermediate_size
        lin = 2 * int4_linear_bytes(I, H) + int4_linear_bytes(H, I) if quant == "int4" else 3 * H * I * dtype_bytes
        untouched = (1 - k / E) ** batch
        total -= sum(E * lin * untouched for i in range(config.num_layers) if config.is_sparse(i))
    total += embedding_bytes(config, dtype_bytes) + config.hidden_size * dtype_bytes  # head and final norm
    all_layers = (0, config.num_layers)
    state = 2 * state_bytes_per_sequence(config, all_layers, dtype_bytes)
    return total + batch * (context * kv_bytes_per_token(config, all_layers, "auto", dtype_bytes) + state)


def measure(make_runner, setup: Setup, work: Workload, config: ModelConfig, dtype: torch.dtype, copy_bps: float,
            hf: dict, chunk_size: int) -> list[dict]:
    """Rows of one setup; a failing measurement becomes an `error` row and the rest go on."""
    rows: list[dict] = []
    prompts = Prompts(config.vocab_size, seed=len(setup.devices))
    with MemoryWatch(setup.devices) as watch:
        t0 = time.perf_counter()
        try:
            runner = make_runner()
        except Exception as e:
            return [dict(setup.label, kind="error", stage="load", error=_short(e))]
        load = dict(setup.label, kind="load", load_s=time.perf_counter() - t0)
        def attempt(what: str, fn) -> None:  # one failing measurement (an OOM at 32k, say) spares the rest
            try:
                row = fn()
                if row is not None:
                    rows.append(row)
            except Exception as e:
                rows.append(dict(setup.label, kind="error", stage=what, error=_short(e)))

        def warm(length: int) -> None:
            timed(runner, prompts, 1, length, 1)

        def prefill(length: int) -> dict:
            ttft = statistics.median(timed(runner, prompts, 1, length, 1) for _ in range(work.repeats))
            return dict(setup.label, kind="prefill", prompt_len=length, ttft_s=ttft, tok_s=length / ttft)

        load["weight_gb"] = [b / GB for b in runner.weight_bytes()]
        # warm-up: kernels compile (a short prompt, then a full prefill chunk), caches settle
        for length in dict.fromkeys((min(work.prompt_lens), min(chunk_size, max(work.prompt_lens)))):
            attempt(f"warm-up {length}", lambda: warm(length))
        for length in work.prompt_lens:
            attempt(f"prefill {length}", lambda: prefill(length))
        for batch in work.batches:
            attempt(f"decode {batch}", lambda: _decode(runner, setup, work, config, dtype, copy_bps, prompts, batch))
        try:
            load["peak_mem_gb"] = {**watch.result(), **runner.memory()}
        except Exception as e:
            load["peak_mem_gb"] = {"error": _short(e)}
        runner.close()
    for row in rows:  # the comparison column
        ref = hf.get(_key(row, setup.devices))
        if setup.engine == "pprt" and ref and row.get("tok_s"):
            row.update(hf_tok_s=ref, vs_hf=row["tok_s"] / ref)
    return [load] + rows


def _decode(runner, setup, work, config, dtype, copy_bps, prompts, batch) -> dict:
    n, p = work.decode_tokens, work.decode_prompt
    timed(runner, prompts, batch, p, 2)  # warm-up at this batch size
    busy0 = runner.busy_seconds()
    t1 = [timed(runner, prompts, batch, p, 1) for _ in range(work.repeats)]
    t2 = [timed(runner, prompts, batch, p, 1 + n) for _ in range(work.repeats)]
    busy1 = runner.busy_seconds()
    decode_s = statistics.median(t2) - statistics.median(t1)
    row = dict(setup.label, kind="decode", batch=batch, decode_prompt=p, new_tokens=n,
               prefill_s=statistics.median(t1), total_s=statistics.median(t2))
    nbytes = decode_bytes(config, setup.weights, dtype.itemsize, batch, p + (n + 1) / 2)
    row.update(bytes_per_step=nbytes, roofline_tok_s=batch * copy_bps / nbytes)
    if decode_s > 0:
        row.update(tok_s=batch * n / decode_s, ms_per_step=1e3 * decode_s / n)
        row["frac_roofline"] = row["tok_s"] / row["roofline_tok_s"]
    else:
        row["error"] = f"decode time not measurable (t(1+{n}) - t(1) = {decode_s:.3g} s)"
    if busy0 is not None:  # pipeline stages: share of the timed runs each stage computed
        row["stage_busy"] = [(b - a) / (sum(t1) + sum(t2)) for a, b in zip(busy0, busy1)]
    return row


def _key(row: dict, devices: tuple[str, ...]) -> tuple:
    """What a pprt row and the transformers row it compares with share."""
    return row["weights"], frozenset(devices), row["kind"], row.get("prompt_len"), row.get("batch")


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) < 600 else text[:600] + " ..."


# ---- the run ------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda s: tuple(int(x) for x in s.split(",") if x)  # noqa: E731
    words = lambda s: tuple(x for x in s.split(",") if x)  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="a checkpoint directory (else random weights)")
    p.add_argument("--config", default="qwen2.5-7b", help=f"random weights from a preset ({', '.join(PRESETS)}) "
                   "or a config.json path")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers of --config")
    p.add_argument("--devices", type=words, default=None, help="devices the stages cycle over (default cuda:0 or cpu)")
    p.add_argument("--stages", type=ints, default=(1, 2), help="stage counts to run (default 1,2)")
    p.add_argument("--transport", default="auto", help="pprt transport between stages (auto, host, nccl, gloo)")
    p.add_argument("--weights", type=words, default=None, help="dtype name and/or int4 (default: <dtype>,int4)")
    p.add_argument("--engines", type=words, default=("pprt", "transformers"))
    p.add_argument("--dtype", default=None, help="model dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--prompts", type=ints, default=(512, 4096, 32768), help="prefill prompt lengths")
    p.add_argument("--batches", type=ints, default=(1, 8, 32), help="decode batch sizes")
    p.add_argument("--decode-prompt", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=2048, help="pprt prefill chunk")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; a setup that would end past it (judged by the slowest so far) is skipped")
    p.add_argument("--work-dir", type=Path, default=None, help="where the random checkpoint is written")
    p.add_argument("--keep-model", action="store_true", help="keep the random checkpoint")
    p.add_argument("--results-dir", type=Path, default=None, help="where generate.jsonl goes")
    p.add_argument("--tiny", action="store_true", help="tiny config, short prompts, 1 and 2 CPU stages (tests)")
    args = p.parse_args(argv)
    if args.tiny:  # the tiny qwen2 unless a tiny preset is named
        args.config = args.config if args.config.startswith("tiny") else "tiny"
        args.devices = args.devices or ("cpu",)
        args.prompts, args.batches, args.decode_prompt, args.decode_tokens, args.repeats = (24, 70), (1, 3), 12, 16, 1
        args.chunk_size = 32  # the 70-token prompt is prefilled in chunks
    args.devices = args.devices or (("cuda:0",) if torch.cuda.is_available() else ("cpu",))
    on_cuda = torch.device(args.devices[0]).type == "cuda"
    from pprt.config import parse_dtype

    args.dtype = parse_dtype(args.dtype) if args.dtype else (torch.bfloat16 if on_cuda else torch.float32)
    args.weights = args.weights or (DTYPE_NAMES[args.dtype], "int4")
    return args


def load_config_dict(args) -> dict:
    if args.model is not None:
        return json.loads((args.model / "config.json").read_text())
    cfg = PRESETS.get(args.config) or json.loads(Path(args.config).read_text())
    return dict(cfg, num_hidden_layers=args.layers) if args.layers else dict(cfg)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    start = time.perf_counter()
    cfg = load_config_dict(args)
    config = ModelConfig.from_dict(cfg)
    window = config.max_position_embeddings
    prompt_lens = tuple(min(n, window - 1) for n in args.prompts)  # the first new token fits the window
    work = Workload(prompt_lens, args.batches, args.decode_prompt, args.decode_tokens, args.repeats)
    max_context = min(window, max(max(prompt_lens) + 1, work.decode_prompt + work.decode_tokens + 1))
    per_seq = -(-(work.decode_prompt + work.decode_tokens + 1) // 16) * 16 + 16
    kv_tokens = max(max(prompt_lens) + 32, max(work.batches) * per_seq)
    kv_layer = kv_bytes_per_token(config, 1, "auto", args.dtype.itemsize)  # the fullest stage holds every
    kv_bytes = int(1.1 * kv_tokens * kv_layer * config.layers_of(0, config.num_layers)[0])  # full-attention layer

    tmp = None
    model = args.model
    if model is None:
        tmp = Path(tempfile.mkdtemp(prefix="pprt-bench-", dir=args.work_dir))
        t0 = time.perf_counter()
        init = args.devices[0] if torch.device(args.devices[0]).type == "cuda" else "cpu"
        model = write_random_checkpoint(cfg, tmp / "model", args.dtype, init)
        print(f"random {args.config} checkpoint written in {time.perf_counter() - t0:.1f} s to {model}")
    copy_bps = copy_bandwidth(args.devices[0], nbytes=1 << 30 if "cuda" in args.devices[0] else 1 << 24)
    env = environment(args.devices[0])
    env.update(model=str(args.model) if args.model else f"random {args.config}" + (
        f" ({args.layers} layers)" if args.layers else ""), copy_GBps=copy_bps / GB, dtype=DTYPE_NAMES[args.dtype])
    print(f"copy bandwidth {copy_bps / GB:.1f} GB/s (read + write) on {args.devices[0]}")

    setups = []
    for weights in args.weights:
        stage_devs = [tuple(args.devices[i % len(args.devices)] for i in range(s)) for s in args.stages]
        if "transformers" in args.engines:  # first, so pprt rows carry the comparison
            for devs in dict.fromkeys(tuple(dict.fromkeys(d)) for d in stage_devs):
                setups.append(Setup("transformers", weights, devs))
        if "pprt" in args.engines:
            setups += [Setup("pprt", weights, devs, args.transport if len(devs) > 1 else "auto")
                       for devs in stage_devs]

    rows, hf, longest = [], {}, 0.0  # longest: seconds of the slowest setup so far
    try:
        for setup in setups:
            now = time.perf_counter() - start
            if args.time_budget is not None and now + longest > args.time_budget:
                new = [dict(setup.label, kind="skipped", error=f"time budget {args.time_budget:.0f} s: "
                            f"{now:.0f} s spent, the slowest setup took {longest:.0f} s")]
            else:
                print(f"-- {setup.engine} {setup.weights} on {','.join(setup.devices)}", flush=True)
                new = measure(_runner_factory(model, setup, args, max_context, kv_bytes), setup, work, config,
                              args.dtype, copy_bps, hf, args.chunk_size)
                _cleanup()
                longest = max(longest, time.perf_counter() - start - now)
            if setup.engine == "transformers":
                hf.update({_key(r, setup.devices): r["tok_s"] for r in new if r.get("tok_s")})
            rows += new
            path = append_results("generate", new, env, args.results_dir)
            for r in new:
                if r["kind"] in ("error", "skipped"):
                    print(f"   {r['kind']}: {r['error']}")
    finally:
        if tmp is not None and not args.keep_model:
            shutil.rmtree(tmp, ignore_errors=True)
    for r in rows:
        r["size"] = r.get("prompt_len") or r.get("batch")
        if r["kind"] == "load":
            r["peak_gb"] = peak_gb(r["peak_mem_gb"])
    print_table(rows, ["engine", "weights", "stages", "kind", "size", "load_s", "ttft_s", "tok_s", "hf_tok_s",
                       "vs_hf", "roofline_tok_s", "frac_roofline", "peak_gb"])
    print(f"appended {len(rows)} rows to {path} in {time.perf_counter() - start:.1f} s")
    return rows


def peak_gb(mem: dict) -> float | None:
    """The headline of a `peak_mem_gb` dict: the most device memory used, else the largest RSS."""
    mem = {k: v for k, v in mem.items() if isinstance(v, float)}
    device = [v for k, v in mem.items() if k.startswith("cuda") and " " not in k]
    return max(device or mem.values(), default=None)


def _runner_factory(model: Path, setup: Setup, args, max_context: int, kv_bytes: int):
    if setup.engine == "pprt":
        return lambda: PprtRunner(model, setup, args.dtype, max_context, kv_bytes, args.chunk_size)
    return lambda: HFRunner(model, setup, args.dtype, None)


def _cleanup() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
