"""python -m pprt.serve: the command line of the OpenAI-compatible server.

    python -m pprt.serve --model Qwen/Qwen3-8B --devices cuda:0,cuda:1 --api-key KEY
    python -m pprt.serve --model Qwen/Qwen3-32B --devices cuda:0 --served-model-name reasoner \\
                         --model Qwen/Qwen3-Coder-30B-A3B-Instruct --devices cuda:1 --served-model-name agent

Each --model starts a model; the options after it (--devices, --served-model-name,
--split, --dtype, --quant, --kv-dtype, --max-context, --kv-cache-memory,
--speculative-ngram, --speculative-mtp, --tool-call-parser, --lora) are that model's, so each model
can have its own cards. `--lora NAME=PATH` (repeatable) loads a PEFT LoRA adapter onto the model
before it: /v1/models lists it as a model whose parent is that model, and requests with
"model": NAME run on the model with that adapter. Without --model the bundled demo model is
served (as "demo"). The server binds 127.0.0.1 unless --host says otherwise;
--port 0 picks a free port. Once it listens it prints one line to stdout:
`pprt.serve: serving NAME[, NAME] at http://HOST:PORT`.

Exit codes: 0 after a clean shutdown (Ctrl-C / SIGTERM); 1 when no model could be loaded
or the serve extra is missing; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import NoReturn

from ..demo_model import demo_model_path
from .models import ModelSpec

# per-model options: flag -> (LLM keyword, type)
_MODEL_OPTIONS = {"--devices": ("devices", str), "--served-model-name": ("name", str), "--split": ("split", str),
                  "--dtype": ("dtype", str), "--quant": ("quant", str), "--kv-dtype": ("kv_dtype", str),
                  "--max-context": ("max_context", int), "--kv-cache-memory": ("kv_cache_memory", int),
                  "--tool-call-parser": ("tool_call_parser", str), "--speculative-ngram": ("speculative", int),
                  "--speculative-mtp": ("speculative_mtp", int)}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _NewModel(argparse.Action):
    """--model: starts a model; options given before the first --model are its own."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        specs = namespace.models
        if specs and specs[-1].get("model") is None:
            specs[-1]["model"] = value
        else:
            specs.append({"model": value})


class _ModelOption(argparse.Action):
    """An option of the latest --model."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        if not namespace.models:
            namespace.models.append({"model": None})
        spec = namespace.models[-1]
        if self.dest in spec:
            parser.error(f"{option_string} is given twice for model {spec.get('model') or '(demo)'}")
        spec[self.dest] = value


class _LoraOption(argparse.Action):
    """--lora NAME=PATH of the latest --model (repeatable)."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        if not namespace.models:
            namespace.models.append({"model": None})
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path.strip():
            parser.error(f"--lora takes NAME=PATH (an adapter directory or hub id), got {value!r}")
        loras = namespace.models[-1].setdefault("lora", {})
        if name.strip() in loras:
            parser.error(f"--lora {name.strip()!r} is given twice for model "
                         f"{namespace.models[-1].get('model') or '(demo)'}")
        loras[name.strip()] = path.strip()


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m pprt.serve", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.set_defaults(models=[])
    m = p.add_argument_group("models (repeat --model for several; the options after it are its own)")
    m.add_argument("--model", action=_NewModel, dest="models", metavar="M",
                   help="model directory or hub id (default: the bundled demo model)")
    for flag, (dest, kind) in _MODEL_OPTIONS.items():
        extra = {"choices": ["hermes", "xml"]} if flag == "--tool-call-parser" else {}
        m.add_argument(flag, action=_ModelOption, dest=dest, type=kind, default=argparse.SUPPRESS,
                       help=_HELP[flag], **extra)
    m.add_argument("--lora", action=_LoraOption, dest="lora", metavar="NAME=PATH", default=argparse.SUPPRESS,
                   help="a PEFT LoRA adapter (directory or hub id) served as model NAME on this model; repeatable")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    s.add_argument("--api-key", default=os.environ.get("PPRT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $PPRT_API_KEY, else none)")
    s.add_argument("--max-waiting", type=int, default=256,
                   help="requests per model that may wait for their first token; more get 503 + Retry-After")
    s.add_argument("--max-body-bytes", type=int, default=8 * 2**20, help="larger request bodies get 413")
    s.add_argument("--stage-processes", action=argparse.BooleanOptionalAction, default=None,
                   help="run each model's stages in processes of their own, also on one device (default: when "
                        "several models are served, for those on a GPU)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


_HELP = {
    "--devices": "comma-separated stages of this model, e.g. cuda:0 or cuda:0,cuda:1 (default: every GPU, or cpu)",
    "--served-model-name": "the name requests use in 'model' (default: the --model argument)",
    "--split": "layers per stage, e.g. 30,34 (default: the planner's)",
    "--dtype": "bfloat16, float16 or float32 (default: bf16 on GPU, fp32 on CPU)",
    "--quant": "quantize a float checkpoint while loading: int4 or fp8",
    "--kv-dtype": "KV cache type: auto, bf16, fp16, fp32 or fp8",
    "--max-context": "longest prompt + generation (default: the model's)",
    "--kv-cache-memory": "bytes of KV cache per stage (default: what the plan leaves)",
    "--speculative-ngram": "speculative decoding: up to K prompt-lookup (n-gram) drafts per step (1-16)",
    "--speculative-mtp": "speculative decoding: K drafts per step from the checkpoint's MTP head (1-16)",
    "--tool-call-parser": "the model's tool-call format: hermes (Qwen2.5/Qwen3) or xml (Qwen3-Coder/Qwen3.5) "
                          "(default: read from its chat template)",
}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[ModelSpec]]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.port < 65536:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    if args.max_waiting < 1 or args.max_body_bytes < 1:
        parser.error("--max-waiting and --max-body-bytes must be >= 1")
    specs = []
    for raw in args.models or [{"model": None}]:
        raw = dict(raw)
        model = raw.pop("model")
        if model is None:  # the bundled demo model, served as "demo" unless named
            model = str(demo_model_path())
            raw.setdefault("name", "demo")
        devices = raw.pop("devices", None)
        devices = [d.strip() for d in devices.split(",")] if devices else None
        if devices is not None and not all(devices):
            parser.error(f"--devices of model {model} has an empty item")
        drafts = {m: raw.pop(key, None) for m, key in (("ngram", "speculative"), ("mtp", "speculative_mtp"))}
        for method, k in drafts.items():
            if k is not None and not 1 <= k <= 16:
                parser.error(f"--speculative-{method} must be in 1..16, got {k}")
        if None not in drafts.values():
            parser.error(f"model {model}: --speculative-ngram and --speculative-mtp are two ways to draft: give one")
        for method, k in drafts.items():
            if k is not None:
                raw["speculative"] = {"method": method, "num_speculative_tokens": k}
        split = raw.pop("split", None)
        if split is not None:
            try:
                raw["split"] = [int(x) for x in split.split(",")]
            except ValueError:
                parser.error(f"--split {split!r} must be comma-separated ints")
        specs.append(ModelSpec(model, name=raw.pop("name", None), devices=devices,
                               tool_call_parser=raw.pop("tool_call_parser", None), options=raw))
    names = [s.served_name for s in specs]
    for name in names:
        if names.count(name) > 1:
            parser.error(f"two models are served as {name!r}: give each its own --served-model-name")
    adapters = [(name, s.served_name) for s in specs for name in s.options.get("lora", {})]
    for name, parent in adapters:
        if name in names:
            parser.error(f"--lora {name!r} of model {parent!r} has the name of a served model: requests could not "
                         "tell them apart")
        if sum(n == name for n, _ in adapters) > 1:
            parser.error(f"two models have a LoRA adapter named {name!r}: give each its own name")
    return args, specs


def main(argv: list[str] | None = None) -> int:
    args, specs = parse_args(argv)
    from ...distributed.stage_main import torchrun_rank

    if torchrun_rank() is not None:
        print("python -m pprt.serve: error: serving under torchrun is not supported: start the server as a "
              "plain program (each model's stages are its own processes)", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvicorn

        from .app import Server
        from .models import load_models
    except ImportError as e:
        print(f"python -m pprt.serve: error: {e.name} is missing: pip install 'pprt[serve]'", file=sys.stderr)
        return 1
    models = load_models(specs, args.max_waiting, args.stage_processes)
    try:
        if not any(m.up for m in models.values()):
            print("python -m pprt.serve: error: no model could be loaded:\n" +
                  "\n".join(f"  {name}: {m.error}" for name, m in models.items()), file=sys.stderr)
            return 1
        server = Server(models, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
        config = uvicorn.Config(server.app(), host=args.host, port=args.port, log_level=args.log_level,
                                access_log=args.log_level == "debug")
        asyncio.run(_serve(uvicorn.Server(config), ", ".join(models), args.host))
        return 0
    finally:
        for m in models.values():
            if m.llm is not None:
                m.llm.close()


async def _serve(server, names: str, host: str) -> None:
    """Run uvicorn; print where it listens once it does."""
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)  # startup only: uvicorn has no "started" event to await
    if server.started:
        port = server.servers[0].sockets[0].getsockname()[1]
        print(f"pprt.serve: serving {names} at http://{host}:{port}", flush=True)
    await task
