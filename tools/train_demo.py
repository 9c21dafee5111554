"""Train the bundled demo model in pprt/demo/ from text every machine has offline.

Contract:
    python tools/train_demo.py [--out pprt/demo] [--max-steps 900] [--budget-min 20]
                               [--seed 0] [--threads 1]

1. Training text: the `.py` files of the running Python's standard library
   (`sysconfig.get_paths()["stdlib"]`), without tests, idlelib, lib2to3,
   pydoc_data (a large docs string), encodings (codec tables), site-packages
   and files that are over 10% digits (data tables). A seeded shuffle holds out 2% of the files for validation.
2. Tokenizer: byte-level BPE trained with `tokenizers` on the training files only,
   with Qwen2's pre-tokenizer regex and NFC normalizer. Special tokens:
   `<|endoftext|>` (id 0, eos and document separator), `<|im_start|>`,
   `<|im_end|>`. No chat template: this is a plain completion model.
3. Model: transformers `Qwen3ForCausalLM` (tied embeddings, even layer count so
   it splits into two pipeline stages), trained on CPU in fp32 with AdamW and a
   cosine schedule on random windows of the token stream. The schedule is
   defined by --max-steps, so a run is deterministic for a given seed, torch
   build and thread count; --budget-min is a safety stop (the run then saves
   what it has and TRAINING.md says it stopped early).
4. Output (the package, bf16 safetensors):
   config.json (old rope spelling: top-level rope_theta, rope_scaling null,
   torch_dtype), generation_config.json, model.safetensors, tokenizer.json,
   tokenizer_config.json, TRAINING.md and training.json (the numbers the
   README quotes). The validation loss and the samples are measured on the
   saved bf16 weights, reloaded with AutoModelForCausalLM (computing in fp32).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# One rayon thread for the tokenizer: the machine is shared, and this keeps
# BPE training order-independent of the core count.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|im_start|>", "<|im_end|>"]
# Qwen2/Qwen3's pre-tokenizer split (single digits, runs of whitespace kept whole).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "pydoc_data", "encodings", "__pycache__"}
PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    def __init__(self):"]


@dataclass(slots=True)
class ModelShape:
    """The demo model's architecture knobs (head_dim fixed at 64, kv heads at 2).

    Sized for the compute, not the package limit: 20 minutes of one CPU thread
    is ~2-4M tokens, for which a ~1.5M-parameter model learns more than a 4M
    one (the 4M model reached only 4.5 nats/token on the same budget). The
    attention width (4 x 64) exceeds hidden_size, as in Qwen3-0.6B.
    """

    vocab_size: int = 4096
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 384
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0

    def __post_init__(self) -> None:
        if self.num_hidden_layers % 2:
            raise ValueError(f"num_hidden_layers={self.num_hidden_layers} must be even (two pipeline stages)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )


@dataclass(slots=True)
class TrainOptions:
    """Optimizer and schedule; every field is a command-line flag."""

    seed: int = 0
    max_steps: int = 2600  # the shipped pprt/demo model (about 27 min on 2 threads)
    budget_min: float = 40.0
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 4e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 150
    threads: int = 2
    val_fraction: float = 0.02

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.batch_size < 1 or self.seq_len < 8:
            raise ValueError(f"max_steps/batch_size/seq_len too small: {self.max_steps}/{self.batch_size}/{self.seq_len}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction={self.val_fraction} must lie in (0, 0.5)")
        if self.budget_min <= 0:
            raise ValueError(f"budget_min={self.budget_min} must be positive")


def collect_sources(root: Path) -> list[tuple[str, str]]:
    """(relative path, text) of every usable stdlib .py file, sorted by path."""
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip() and sum(c.isdigit() for c in text) < 0.1 * len(text):  # no data tables
            files.append((rel.as_posix(), text))
    if not files:
        raise RuntimeError(f"no Python sources found under {root}")
    return files


def split_files(files: list[tuple[str, str]], fraction: float, seed: int) -> tuple[list, list]:
    """Seeded file-level split: (train, validation), each sorted by path."""
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(files) * fraction))
    val_idx = set(order[:n_val])
    train = [f for i, f in enumerate(files) if i not in val_idx]
    val = [f for i, f in enumerate(files) if i in val_idx]
    return train, val


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE in Qwen's layout; special tokens take ids 0..2."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if tok.token_to_id(EOS) != 0:
        raise RuntimeError(f"{EOS} got id {tok.token_to_id(EOS)}, expected 0")
    return tok


def tokenizer_config(model_max_length: int) -> dict:
    """tokenizer_config.json for transformers; deliberately no chat_template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": model_max_length,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, t in enumerate(SPECIAL_TOKENS)
        },
    }


def encode_stream(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents, each followed by eos, as one int64 stream [n_tokens]."""
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def lr_at(step: int, opt: TrainOptions) -> float:
    """Linear warmup, then cosine from lr to lr * min_lr_ratio at max_steps."""
    if step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    progress = (step - opt.warmup_steps) / max(1, opt.max_steps - opt.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return opt.lr * (opt.min_lr_ratio + (1.0 - opt.min_lr_ratio) * cosine)


def lm_loss(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy (nats) of windows [B, T+1]."""
    logits = model(input_ids=windows[:, :-1]).logits  # [B, T, V]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: torch.nn.Module, stream: torch.Tensor, seq_len: int, batch_size: int, max_windows: int | None = None) -> tuple[float, int]:
    """(mean nats/token, tokens scored) over non-overlapping windows of the stream."""
    model.eval()
    n_win = (stream.numel() - 1) // seq_len
    if max_windows is not None:
        n_win = min(n_win, max_windows)
    starts = torch.arange(n_win) * seq_len
    total, count = 0.0, 0
    for i in range(0, n_win, batch_size):
        s = starts[i : i + batch_size]
        windows = torch.stack([stream[a : a + seq_len + 1] for a in s.tolist()])  # [b, T+1]
        loss = lm_loss(model, windows)
        n = windows.shape[0] * seq_len
        total += loss.item() * n
        count += n
    model.train()
    return total / count, count


def build_model(shape: ModelShape, eos_id: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=None,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=shape.num_hidden_layers,
        attn_implementation="sdpa",
    )
    return Qwen3ForCausalLM(config)


def make_optimizer(model: torch.nn.Module, opt: TrainOptions) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms (1-D tensors)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=opt.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )


def train(model: torch.nn.Module, train_stream: torch.Tensor, val_stream: torch.Tensor, opt: TrainOptions) -> dict:
    """Run the loop; returns the log (steps done, time, loss curve, early stop)."""
    optimizer = make_optimizer(model, opt)
    gen = torch.Generator().manual_seed(opt.seed)
    max_start = train_stream.numel() - opt.seq_len - 1
    offsets = torch.arange(opt.seq_len + 1)
    curve = []
    budget_s = opt.budget_min * 60.0
    t0 = time.monotonic()
    stopped_early = False
    step = 0
    recent = []
    for step in range(opt.max_steps):
        if time.monotonic() - t0 > budget_s:
            stopped_early = True
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, opt)
        starts = torch.randint(0, max_start, (opt.batch_size,), generator=gen)
        windows = train_stream[starts[:, None] + offsets]  # [B, T+1]
        loss = lm_loss(model, windows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
        optimizer.step()
        recent.append(loss.item())
        if (step + 1) % opt.eval_every == 0 or step + 1 == opt.max_steps:
            val, _ = evaluate(model, val_stream, opt.seq_len, opt.batch_size, max_windows=64)
            elapsed = time.monotonic() - t0
            row = {"step": step + 1, "train_loss": sum(recent) / len(recent), "val_loss": val, "elapsed_s": round(elapsed, 1)}
            curve.append(row)
            recent = []
            print(
                f"step {step + 1:5d}/{opt.max_steps}  train {row['train_loss']:.3f}  val {val:.3f}  "
                f"lr {lr_at(step, opt):.2e}  {elapsed / 60:.1f} min",
                flush=True,
            )
    else:
        step = opt.max_steps
    return {
        "steps_done": step,
        "stopped_early": stopped_early,
        "train_time_s": round(time.monotonic() - t0, 1),
        "curve": curve,
    }


def write_config_old_spelling(path: Path, rope_theta: float) -> None:
    """Rewrite config.json the way real Qwen checkpoints spell it (rope_theta top level)."""
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = float(rope.get("rope_theta", rope_theta))
    cfg["rope_scaling"] = None
    cfg.pop("dtype", None)
    cfg["torch_dtype"] = "bfloat16"
    cfg["architectures"] = ["Qwen3ForCausalLM"]
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def generate_samples(model, tokenizer, max_new_tokens: int = 64, seed: int = 0) -> list[dict]:
    """Greedy and sampled (generation_config's defaults, seeded) continuations of PROMPTS."""
    out = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        greedy = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens)
        torch.manual_seed(seed)
        sampled = model.generate(ids, do_sample=True, max_new_tokens=max_new_tokens)
        out.append(
            {
                "prompt": prompt,
                "greedy": tokenizer.decode(greedy[0, ids.shape[1] :], skip_special_tokens=False),
                "sampled": tokenizer.decode(sampled[0, ids.shape[1] :], skip_special_tokens=False),
            }
        )
    return out


def write_report(out: Path, report: dict) -> None:
    """TRAINING.md: the numbers and samples, human-readable."""
    d, m, t = report["data"], report["model"], report["training"]
    lines = [
        "# pprt demo model",
        "",
        "A small Qwen3-architecture completion model (no chat template) trained by",
        "`tools/train_demo.py` on the Python standard library's own source, so every",
        "machine can rebuild it offline. It writes plausible-looking Python; it knows",
        "nothing else. Its purpose is to exercise pprt end to end without a download.",
        "",
        "## Training data",
        "",
        f"- Source: the `.py` files of the Python {d['python_version']} standard library "
        "(without tests, idlelib, lib2to3, pydoc_data, encodings, site-packages, and files over 10% digits).",
        f"- {d['train_files']} training files ({d['train_bytes'] / 1e6:.1f} MB, {d['train_tokens']:,} tokens), "
        f"{d['val_files']} held-out validation files ({d['val_bytes'] / 1e6:.2f} MB, {d['val_tokens']:,} tokens), "
        f"split by a seeded shuffle of files (seed {report['options']['seed']}).",
        f"- Tokenizer: byte-level BPE, {m['vocab_size']} tokens including `<|endoftext|>` (id 0, eos), "
        f"`<|im_start|>`, `<|im_end|>`; Qwen2 pre-tokenizer; {d['bytes_per_token']:.2f} bytes/token on training text.",
        "",
        "## Model",
        "",
        f"- Qwen3ForCausalLM: {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, "
        f"{m['num_attention_heads']} query heads / {m['num_key_value_heads']} KV heads of dim {m['head_dim']}, "
        f"MLP {m['intermediate_size']}, tied embeddings, rope_theta {m['rope_theta']:.0e}.",
        f"- Parameters: {m['parameters']:,} ({m['parameters'] / 1e6:.2f} M, embedding/head shared: {m['embedding_parameters']:,}).",
        f"- Files: model.safetensors {m['safetensors_bytes'] / 1e6:.2f} MB (bfloat16); "
        f"whole directory {m['package_bytes'] / 1e6:.2f} MB.",
        "",
        "## Training",
        "",
        f"- {t['steps_done']} steps of {report['options']['batch_size']} x {report['options']['seq_len']} tokens "
        f"= {t['tokens_seen']:,} tokens seen ({t['tokens_seen'] / d['train_tokens']:.2f} epochs); "
        f"AdamW (0.9, 0.95), peak lr {report['options']['lr']}, warmup {report['options']['warmup_steps']}, "
        f"cosine to {report['options']['min_lr_ratio']} x peak, weight decay {report['options']['weight_decay']}, fp32.",
        f"- Wall clock: {t['train_time_s'] / 60:.1f} min of training ({t['total_time_s'] / 60:.1f} min for the whole script) "
        f"on {t['threads']} CPU thread(s) of {t['cpu']}."
        + (" Stopped early at the time budget." if t["stopped_early"] else ""),
        f"- **Validation loss: {t['val_loss_nats']:.3f} nats/token** ({t['val_bits_per_byte']:.3f} bits/byte) "
        f"over {t['val_tokens_scored']:,} held-out tokens, measured on the saved bf16 weights.",
        "",
        "| step | train loss | val loss (64 windows) | minutes |",
        "|---:|---:|---:|---:|",
    ]
    for row in t["curve"]:
        lines.append(f"| {row['step']} | {row['train_loss']:.3f} | {row['val_loss']:.3f} | {row['elapsed_s'] / 60:.1f} |")
    lines += [
        "",
        "## Samples",
        "",
        "From the saved model reloaded with `AutoModelForCausalLM` (fp32 compute), 64 new tokens. "
        "Greedy, then sampled with generation_config.json's defaults "
        f"(temperature {report['generation']['temperature']}, top_p {report['generation']['top_p']}, torch seed 0). "
        "Computing in bf16 instead (transformers' dtype='auto') rounds differently, and greedy text "
        "can part from these after a few tokens where two logits nearly tie.",
        "",
    ]
    for s in report["samples"]:
        for kind in ("greedy", "sampled"):
            lines += [f"{kind}, prompt `{s['prompt']!r}`:", "", "```python", s["prompt"] + s[kind], "```", ""]
    lines += [
        "## Reproduce",
        "",
        "```",
        f"python tools/train_demo.py --seed {report['options']['seed']} --max-steps {report['options']['max_steps']} "
        f"--threads {t['threads']}",
        "```",
        "",
        "The step count fixes the schedule, so the run is deterministic for a given torch build,",
        "Python version (the stdlib is the data) and thread count; timings depend on the machine.",
        "",
    ]
    (out / "TRAINING.md").write_text("\n".join(lines))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv: list[str] | None) -> tuple[Path, TrainOptions, ModelShape]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "pprt" / "demo")
    defaults = TrainOptions()
    for name in asdict(defaults):
        p.add_argument("--" + name.replace("_", "-"), type=type(getattr(defaults, name)), default=getattr(defaults, name))
    shape_defaults = ModelShape()
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(shape_defaults, name))
    a = vars(p.parse_args(argv))
    out = a.pop("out")
    shape = ModelShape(**{k: a.pop(k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")})
    return out, TrainOptions(**a), shape


def main(argv: list[str] | None = None) -> int:
    out, opt, shape = parse_args(argv)
    t_start = time.monotonic()
    torch.set_num_threads(opt.threads)
    torch.manual_seed(opt.seed)
    random.seed(opt.seed)

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = collect_sources(stdlib)
    train_files, val_files = split_files(files, opt.val_fraction, opt.seed)
    train_texts = [t for _, t in train_files]
    val_texts = [t for _, t in val_files]
    print(f"data: {len(train_files)} train / {len(val_files)} val files from {stdlib}", flush=True)

    tok = train_tokenizer(train_texts, shape.vocab_size)
    if tok.get_vocab_size() != shape.vocab_size:
        print(f"tokenizer has {tok.get_vocab_size()} tokens; using that as vocab_size", flush=True)
        shape.vocab_size = tok.get_vocab_size()
    train_stream = encode_stream(tok, train_texts)
    val_stream = encode_stream(tok, val_texts)
    train_bytes = sum(len(t.encode()) for t in train_texts)
    val_bytes = sum(len(t.encode()) for t in val_texts)
    print(f"tokens: {train_stream.numel():,} train, {val_stream.numel():,} val ({train_bytes / train_stream.numel():.2f} bytes/token)", flush=True)

    eos_id = tok.token_to_id(EOS)
    model = build_model(shape, eos_id)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)
    log = train(model, train_stream, val_stream, opt)

    # Save the package in bf16, the way Qwen checkpoints ship.
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    for stale in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        (out / stale).unlink(missing_ok=True)
    gen_cfg = GenerationConfig(
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        do_sample=True,
        temperature=0.8,
        top_p=0.95,
        top_k=0,
        repetition_penalty=1.0,
        max_new_tokens=256,
    )
    model.generation_config = gen_cfg
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    write_config_old_spelling(out / "config.json", shape.rope_theta)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(shape.max_position_embeddings), indent=2) + "\n")

    # Measure what ships: reload the bf16 files, compute in fp32.
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    hf_tok = AutoTokenizer.from_pretrained(out)
    val_loss, val_count = evaluate(reloaded, val_stream, opt.seq_len, opt.batch_size)
    scored = val_stream[1 : val_count + 1].tolist()  # the targets evaluate() scored
    val_windows_bytes = len(tok.decode(scored, skip_special_tokens=True).encode())
    samples = generate_samples(reloaded, hf_tok, seed=opt.seed)
    gen_saved = json.loads((out / "generation_config.json").read_text())

    report = {
        "options": asdict(opt),
        "data": {
            "python_version": platform.python_version(),
            "stdlib": str(stdlib),
            "train_files": len(train_files),
            "val_files": len(val_files),
            "val_file_names": [n for n, _ in val_files],
            "train_bytes": train_bytes,
            "val_bytes": val_bytes,
            "train_tokens": train_stream.numel(),
            "val_tokens": val_stream.numel(),
            "bytes_per_token": train_bytes / train_stream.numel(),
        },
        "model": {
            **asdict(shape),
            "parameters": n_params,
            "embedding_parameters": shape.vocab_size * shape.hidden_size,
            "safetensors_bytes": (out / "model.safetensors").stat().st_size,
            "package_bytes": 0,
        },
        "training": {
            **{k: v for k, v in log.items()},
            "tokens_seen": log["steps_done"] * opt.batch_size * opt.seq_len,
            "threads": opt.threads,
            "cpu": cpu_name(),
            "torch_version": torch.__version__,
            "val_loss_nats": val_loss,
            "val_tokens_scored": val_count,
            "val_bits_per_byte": val_loss * val_count / math.log(2) / val_windows_bytes,
            "total_time_s": 0.0,
        },
        "generation": {"temperature": gen_saved.get("temperature"), "top_p": gen_saved.get("top_p")},
        "samples": samples,
    }
    report["training"]["total_time_s"] = round(time.monotonic() - t_start, 1)
    for _ in range(2):  # the package size includes the report files themselves
        write_report(out, report)
        (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
        report["model"]["package_bytes"] = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    write_report(out, report)
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")

    print(f"saved {out}: {report['model']['package_bytes'] / 1e6:.2f} MB, val loss {val_loss:.3f} nats/token", flush=True)
    for s in samples:
        print(f"--- greedy {s['prompt']!r}\n{s['prompt']}{s['greedy']}\n--- sampled\n{s['prompt']}{s['sampled']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
