"""python -m pprt.generate: complete a prompt, or chat, from the command line.

A thin layer over the public API: the arguments become the `LLM` and
`SamplingParams` a library user would build. The prompt comes from --prompt,
--prompt-file, or standard input. The completion streams to stdout piece by
piece; statistics (load time, time to first token, prefill and decode
tokens/s, memory per device) go to stderr. --json prints one JSON object
instead. --chat runs a multi-turn session over stdin with the model's chat
template, one line per user turn (/reset clears the history, /exit ends).

Exit codes: 0 done; 1 the model could not be loaded or run (the loader's
message, no traceback); 2 bad arguments (one line naming the argument);
130 interrupted. PPRT_DEBUG=1 shows the traceback of an error. Under torchrun, ranks other than 0 serve as pipeline stages
and rank 0 runs this program as the driver.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import NoReturn, TextIO

from .. import LLM, Completion, SamplingParams, Stats
from ..distributed.pipeline import DEFAULT_STAGE_TIMEOUT_S
from ..distributed.stage_main import serve_torchrun, torchrun_rank
from ..errors import ConfigError
from ..rope import DEFAULT_MAX_POSITION, DEFAULT_THETA, rope_from_user
from .demo_model import demo_model_path

DEFAULT_MAX_NEW_TOKENS = 128


class UsageError(Exception):
    """A bad argument: exit 2 with this one-line message."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m pprt.generate", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, help="model directory or hub id (default: the bundled demo model)")
    m.add_argument("--devices", default=None,
                   help="comma-separated stages, e.g. cuda:0,cuda:1 or cpu,cpu (default: every GPU; "
                        "the demo model on a machine without GPU: cpu,cpu)")
    m.add_argument("--split", default=None, help="layers per stage, e.g. 30,50 (default: the planner's)")
    m.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: bf16 on GPU, fp32 on CPU)")
    m.add_argument("--quant", default=None, choices=["int4", "fp8"],
                   help="quantize a float checkpoint while loading (Int4 RTN, or FP8 block 128)")
    m.add_argument("--kv-dtype", default="auto", help="KV cache type: auto, bf16, fp16, fp32 or fp8")
    m.add_argument("--max-context", type=int, default=None, help="longest prompt + generation (default: the model's)")
    m.add_argument("--rope-scaling", default=None, metavar="JSON",
                   help="rope scaling instead of the checkpoint's, in config.json's spelling, e.g. "
                        "'{\"rope_type\":\"yarn\",\"factor\":4.0,\"original_max_position_embeddings\":32768}' "
                        "(default: the checkpoint's; past its window pprt enables YaRN itself)")
    m.add_argument("--transport", default="auto", choices=["auto", "nccl", "gloo", "host"],
                   help="how stages pass activations: auto (NCCL between GPUs), or host (through pinned host "
                        "memory, for machines where GPU peer-to-peer hangs)")
    m.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs (by default a CUDA stage replays captured graphs for decode steps)")
    m.add_argument("--speculative-ngram", type=int, default=None, metavar="K",
                   help="speculative decoding: up to K prompt-lookup (n-gram) drafts per step, verified by the model")
    m.add_argument("--speculative-mtp", type=int, default=None, metavar="K",
                   help="speculative decoding: K drafts per step from the checkpoint's own multi-token-prediction "
                        "head (Qwen3-Next, Qwen3.5 family), on the last stage, verified by the model")
    m.add_argument("--stage-timeout", type=float, default=DEFAULT_STAGE_TIMEOUT_S,
                   help="seconds a stage process may leave a heartbeat unanswered before it counts as hung")
    m.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse the KV of a prefix shared with earlier requests (--chat turns)")
    m.add_argument("--lora", default=None, metavar="PATH",
                   help="run the prompt with this PEFT LoRA adapter (directory or hub id)")
    m.add_argument("--merge-lora", action="store_true", help="fold --lora into the float weights at load")
    i = p.add_argument_group("input and output")
    src = i.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="the prompt (default: read standard input)")
    src.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    src.add_argument("--chat", action="store_true", help="interactive multi-turn chat over stdin (needs a chat template)")
    i.add_argument("--system", default=None, help="system message for --chat")
    i.add_argument("--no-think", action="store_true", help="--chat: ask the template not to think (enable_thinking=False)")
    i.add_argument("--json", action="store_true", help="print one JSON object (text, token_ids, finish_reason, statistics)")
    i.add_argument("--quiet", action="store_true", help="no statistics on stderr")
    s = p.add_argument_group("sampling (default: the model's generation_config.json)")
    s.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    s.add_argument("--temperature", type=float, default=None, help="0 (or below 1e-5) = greedy")
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--min-p", type=float, default=None)
    s.add_argument("--repetition-penalty", type=float, default=None)
    s.add_argument("--presence-penalty", type=float, default=None, help="OpenAI's, in [-2, 2]")
    s.add_argument("--frequency-penalty", type=float, default=None, help="OpenAI's, in [-2, 2]")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.chat and (args.system is not None or args.no_think):
        parser.error("--system and --no-think need --chat")
    if args.chat and args.json:
        parser.error("--json prints one completion: it cannot be combined with --chat")
    if args.max_context is not None and args.max_context < 1:
        parser.error(f"--max-context must be >= 1, got {args.max_context}")
    if args.merge_lora and args.lora is None:
        parser.error("--merge-lora needs --lora PATH")
    if not args.stage_timeout > 0:
        parser.error(f"--stage-timeout must be > 0 seconds, got {args.stage_timeout}")
    for flag in ("ngram", "mtp"):
        k = getattr(args, f"speculative_{flag}")
        if k is not None and not 1 <= k <= 16:
            parser.error(f"--speculative-{flag} must be in 1..16, got {k}")
    if args.speculative_ngram is not None and args.speculative_mtp is not None:
        parser.error("--speculative-ngram and --speculative-mtp are two ways to draft: give one")
    try:
        args.device_list = _split_list(args.devices, str, "--devices")
        args.split_list = _split_list(args.split, int, "--split")
        for device in args.device_list or ():
            _check_device(device)
        args.sampling = sampling_params(args)
        args.rope_scaling_spec = parse_rope_scaling(args.rope_scaling)
    except (UsageError, ValueError) as e:
        parser.error(_flag_names(str(e)))
    if args.split_list and args.device_list and len(args.split_list) != len(args.device_list):
        parser.error(f"--split has {len(args.split_list)} stages but --devices names {len(args.device_list)}")
    return args


def parse_rope_scaling(text: str | None) -> dict | None:
    """--rope-scaling's JSON object, checked as far as it can be without the model."""
    if text is None:
        return None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--rope-scaling {text!r} is not JSON ({e})") from None
    try:  # the model's own theta and window replace these placeholders at load
        rope_from_user(spec, theta=DEFAULT_THETA, max_position=DEFAULT_MAX_POSITION, where="--rope-scaling")
    except ConfigError as e:
        raise UsageError(str(e)) from None
    return spec


def _split_list(value: str | None, kind: type, flag: str) -> list | None:
    if value is None:
        return None
    items = [x.strip() for x in value.split(",")]
    if not all(items):
        raise UsageError(f"{flag} {value!r} has an empty item")
    try:
        return [kind(x) for x in items]
    except ValueError:
        raise UsageError(f"{flag} {value!r} must be comma-separated {kind.__name__}s") from None


def _check_device(device: str) -> None:
    import torch

    try:
        torch.device(device)
    except RuntimeError:
        raise UsageError(f"--devices: {device!r} is not a device (cpu, cuda:0, ...)") from None


CLI_LORA = "lora"  # the name --lora's adapter is loaded under

# SamplingParams fields named as the flags that set them, for error messages.
_FLAGS = {"max_tokens": "--max-new-tokens", "top_p": "--top-p", "top_k": "--top-k", "min_p": "--min-p",
          "repetition_penalty": "--repetition-penalty", "presence_penalty": "--presence-penalty",
          "frequency_penalty": "--frequency-penalty", "temperature": "--temperature", "seed": "--seed",
          "stop": "--stop"}


def _flag_names(message: str) -> str:
    field, sep, rest = message.partition(" ")
    return _FLAGS.get(field, field) + sep + rest


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The SamplingParams a library user would write for these flags (ValueError names a bad one)."""
    return SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.seed, stop=args.stop, lora=CLI_LORA if args.lora else None)


def read_prompt(args: argparse.Namespace, stdin: TextIO) -> str:
    if args.prompt is not None:
        prompt = args.prompt
    elif args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read --prompt-file {args.prompt_file!r}: {e}") from None
    else:
        if stdin.isatty():
            print("reading the prompt from stdin (end with Ctrl-D)", file=sys.stderr)
        prompt = stdin.read()
    if not prompt:
        raise UsageError("the prompt is empty")
    return prompt


def open_model(args: argparse.Namespace) -> LLM:
    """Build the LLM (the demo model on two CPU stages when nothing else is asked on a GPU-less machine)."""
    model, devices = args.model, args.device_list
    if model is None:
        model = str(demo_model_path())
        if not os.path.isdir(model):
            raise FileNotFoundError(f"the bundled demo model is missing ({model}); pass --model")
        if devices is None and not torchrun_rank() and not _has_cuda():
            devices = ["cpu", "cpu"]  # the demo runs as a two-stage pipeline
    return LLM(model, devices=devices, split=args.split_list, dtype=args.dtype, quant=args.quant,
               max_context=args.max_context, kv_dtype=args.kv_dtype, transport=args.transport, seed=args.seed,
               rope_scaling=args.rope_scaling_spec, stage_timeout=args.stage_timeout,
               enable_prefix_caching=not args.no_prefix_caching,
               lora={CLI_LORA: args.lora} if args.lora else None, merge=args.merge_lora,
               enforce_eager=args.enforce_eager,
               speculative=_speculative(args))


def _speculative(args: argparse.Namespace) -> dict | None:
    """LLM's `speculative` from --speculative-ngram K or --speculative-mtp K (None: neither)."""
    for method in ("ngram", "mtp"):
        k = getattr(args, f"speculative_{method}")
        if k is not None:
            return {"method": method, "num_speculative_tokens": k}
    return None


def stream_completion(llm: LLM, prompt: str, params: SamplingParams, out: TextIO | None) -> tuple[Completion, dict]:
    """Stream `prompt`'s completion to `out` (None: silently); returns it and its timings."""
    prompt_tokens = len(llm.tokenizer.encode(prompt)) if llm.tokenizer is not None else 0
    t0 = time.perf_counter()
    first = None
    gen = llm.stream(prompt, params)
    while True:
        try:
            piece = next(gen)
        except StopIteration as end:
            completion = end.value  # the engine's stream returns its Completion when done
            break
        first = first or time.perf_counter()
        if out is not None:
            out.write(piece)
            out.flush()
    total = time.perf_counter() - t0
    ttft = (first or time.perf_counter()) - t0
    n = len(completion.token_ids)
    stats = {"prompt_tokens": prompt_tokens, "new_tokens": n, "time_to_first_token_s": round(ttft, 4),
             "total_s": round(total, 4),
             "prefill_tokens_per_s": round(prompt_tokens / ttft, 2) if ttft > 0 else None,
             "decode_tokens_per_s": round((n - 1) / (total - ttft), 2) if n > 1 and total > ttft else None}
    return completion, stats


def memory_report(stats: Stats) -> list[dict]:
    """Per stage: its device, layers, weight bytes and peak memory (host RSS; GPU allocator peak on CUDA)."""
    return [{"stage": st.stage, "device": st.device, "layers": list(st.layers), "weight_bytes": st.weight_bytes,
             "peak_rss_bytes": st.peak_rss_bytes, "peak_device_bytes": st.peak_device_bytes}
            for st in stats.stages]


def speculative_report(stats: Stats) -> dict:
    """Drafts sent and accepted, the acceptance rate and tokens gained per verify step."""
    return {"draft_tokens": stats.draft_tokens, "accepted_tokens": stats.accepted_tokens,
            "acceptance_rate": round(stats.acceptance_rate, 4),
            "mean_accepted_length": round(stats.mean_accepted_length, 4)}


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.1f} MiB"


def format_stats(stats: dict) -> str:
    def rate(x):
        return "-" if x is None else f"{x:.1f} tok/s"

    quantized = f" (quantizing {stats['quantize_s']:.2f} s)" if stats.get("quantize_s") else ""
    cached = f" ({stats['cached_prompt_tokens']} cached)" if stats.get("cached_prompt_tokens") else ""
    lines = [f"[pprt] load {stats['load_s']:.2f} s{quantized} | prompt {stats['prompt_tokens']} tokens{cached}, "
             "first token in "
             f"{stats['time_to_first_token_s']:.3f} s (prefill {rate(stats['prefill_tokens_per_s'])}) | "
             f"{stats['new_tokens']} new tokens (decode {rate(stats['decode_tokens_per_s'])}) | "
             f"finish: {stats['finish_reason']}"]
    if stats.get("speculative"):
        sp = stats["speculative"]
        lines.append(f"[pprt] speculative: {sp['accepted_tokens']} of {sp['draft_tokens']} drafts accepted "
                     f"({sp['acceptance_rate']:.0%}), {sp['mean_accepted_length']:.2f} tokens per verify step")
    for m in stats.get("memory", []):
        peak = f"peak {m['device']} {_mb(m['peak_device_bytes'])}, " if m["peak_device_bytes"] is not None else ""
        lines.append(f"[pprt] stage {m['stage']} {m['device']} layers {m['layers'][0]}-{m['layers'][1] - 1}: "
                     f"weights {_mb(m['weight_bytes'])}, {peak}peak RSS {_mb(m['peak_rss_bytes'])}")
    return "\n".join(lines)


def prefix_report(before: Stats, after: Stats) -> dict:
    """What the prefix cache gave one request: its prompt tokens taken from the cache, and the
    hit rate over every request so far."""
    return {"cached_prompt_tokens": after.prefix_cached_tokens - before.prefix_cached_tokens,
            "prefix_hit_rate": round(after.prefix_hit_rate, 4)}


def run_completion(llm: LLM, args: argparse.Namespace, prompt: str, load_s: float) -> None:
    before = llm.stats()
    completion, stats = stream_completion(llm, prompt, args.sampling, None if args.json else sys.stdout)
    counters = llm.stats()
    stats = {"load_s": round(load_s, 3), "quantize_s": round(counters.quantize_seconds, 3), **stats,
             **prefix_report(before, counters), "finish_reason": completion.finish_reason,
             "memory": memory_report(counters)}
    if counters.draft_tokens:
        stats["speculative"] = speculative_report(counters)
    if args.json:
        print(json.dumps({"text": completion.text, "token_ids": completion.token_ids,
                          "prompt_token_ids": completion.prompt_token_ids,
                          "finish_reason": completion.finish_reason, "statistics": stats}, ensure_ascii=False))
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not args.quiet:
        print(format_stats(stats), file=sys.stderr)


def run_chat(llm: LLM, args: argparse.Namespace, stdin: TextIO, load_s: float) -> None:
    """One user turn per input line; each reply streams to stdout and ends with a newline."""
    if llm.tokenizer is None or not llm.tokenizer.has_chat_template:
        raise UsageError(f"model {llm.source.name!r} has no chat template, which --chat needs: it is a plain "
                         "completion model (give it --prompt instead)")
    system = [{"role": "system", "content": args.system}] if args.system else []
    template_kwargs = {"enable_thinking": False} if args.no_think else {}
    history: list[dict] = []
    interactive = stdin.isatty()
    if interactive:
        print("chat: one message per line; /reset clears the history, /exit or Ctrl-D ends", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:
            break
        message = line.rstrip("\n")
        if message.strip() in ("/exit", "/quit"):
            break
        if message.strip() == "/reset":
            history = []
            continue
        if not message.strip():
            continue
        history.append({"role": "user", "content": message})
        # What LLM.chat renders, streamed: the same template, add_generation_prompt, kwargs.
        prompt = llm.tokenizer.apply_chat_template(system + history, add_generation_prompt=True, **template_kwargs)
        before = llm.stats()
        completion, stats = stream_completion(llm, prompt, args.sampling, sys.stdout)
        stats.update(prefix_report(before, llm.stats()))
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": completion.text})
        if not args.quiet:
            stats = {"load_s": round(load_s, 3), **stats, "finish_reason": completion.finish_reason}
            print(format_stats(stats), file=sys.stderr)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None, stdin: TextIO | None = None) -> int:
    args = parse_args(argv)
    rank = torchrun_rank()
    if rank is not None and rank[0] != 0:  # this rank is a pipeline stage until rank 0's LLM closes
        serve_torchrun()
        return 0
    stdin = stdin or sys.stdin
    llm = None
    try:
        prompt = None if args.chat else read_prompt(args, stdin)
        t0 = time.perf_counter()
        try:
            llm = open_model(args)
        except ValueError as e:  # ConfigError is a ValueError, but a broken checkpoint, not a bad argument
            if isinstance(e, ConfigError):
                raise
            raise UsageError(str(e)) from None
        load_s = time.perf_counter() - t0
        if args.chat:
            run_chat(llm, args, stdin, load_s)
        else:
            run_completion(llm, args, prompt, load_s)
        return 0
    except UsageError as e:
        print(f"python -m pprt.generate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the loader's (or the engine's) message, without a traceback
        if os.environ.get("PPRT_DEBUG"):
            raise
        what = "cannot load the model" if llm is None else "generation failed"
        print(f"error: {what}: {_first_line(e)}", file=sys.stderr)
        return 1
    finally:
        if llm is not None:
            llm.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    first, _, rest = text.partition("\n")
    # Keep a planner's explanation (several short lines) but never a traceback.
    return text if rest and "Traceback" not in rest else first


if __name__ == "__main__":
    sys.exit(main())
