"""Pipeline benchmark on CPU: 2 stages of one thread each against 1 stage of one thread.

A random qwen3 checkpoint (hidden 1024, 8 layers; written once to a temp dir)
runs through `pprt.LLM` with devices ["cpu"] (torch held to 1 thread in this
process) and ["cpu", "cpu"] (each stage process held to 1 thread). Phases:

  - prefill: 4 prompts x 1024 tokens, chunk 256, one generated token each;
  - decode: 32 sequences of 1-token prompts decoding 48 tokens (every step,
    the first included, is one token per sequence: 32 rows on 1 stage, two
    micro-batches of 16 rows on 2 stages);
  - small: 1 and 4 sequences decoding (weight-read bound);
  - control: 1 sequence decoding through a tiny model (hidden 64, 2 layers),
    where a step is almost nothing but control messages and transport.

Per phase, stage stats are taken before and after, so every figure covers
exactly that phase:
  - tok_s: tokens (prompt tokens for prefill, generated tokens otherwise) / wall;
  - busy_k = stage k's busy_seconds (timed inside the worker) / wall;
    wait_k = its wait_seconds (blocked receiving hidden states) / wall;
    cpu_k = its process CPU time (/proc) / wall, so a stage spinning while
    waiting would show cpu_k > busy_k;
  - driver: drv_cpu_ms = this process's CPU time per step (what the driver
    takes from the cores the stages need), submit_ms = time in
    executor.submit per step (pickle + pipe writes), loop_ms = wall - time in
    submit - time in result, per step (scheduler, token bookkeeping);
  - overhead_ms (depth-1 phases only, where nothing overlaps): wall per step
    minus the stages' busy time per step = control + transport latency on the
    critical path; xfer_ms = stage 1's wait minus stage 0's busy per step
    (how long stage 1 waited beyond stage 0's compute: the hidden states'
    transfer plus the plan reaching stage 1 late).
  - cpu_ms_tok: CPU milliseconds per token, all processes (stages and
    driver); on 2-stage rows cpu_eff = 1-stage cpu_ms_tok / 2-stage
    cpu_ms_tok: the work the pipeline adds, whatever share of the cores the
    machine's other jobs left us (which wall-clock figures cannot separate).
Figures:
  - efficiency = 2-stage tok_s / (2 x 1-stage tok_s) (prefill, decode);
  - ratio = 2-stage tok_s / 1-stage tok_s (small batches);
  - the confounders, measured apart: `two_cores` = GFLOP/s per process of a
    [rows, H] @ [H, 3H] loop run in 2 processes at once / in 1 process alone;
    `rows_eff` = GFLOP/s of that matmul at the 2-stage micro-batch rows / at
    the 1-stage rows (decode: 16 vs 32; prefill: 256 vs 256). Their product is
    the efficiency a loss-free pipeline would reach here; efficiency / that
    product (`pipe_eff`) is the pipeline's own share; `fill_bound` =
    steps / (steps + 1) is the busy fraction a 2-stage pipeline reaches at
    best over a finite phase of `steps` micro-batches (fill and drain);
  - `gloo_us`: one-way gloo send/recv latency of [rows, H] float32 between two
    processes (ping-pong / 2); `gloo_cpu_us`: CPU time per process per send +
    recv pair (the cost itself, apart from waiting for a core).
Goals: busy >= 0.9 per stage with >= 2 micro-batches in flight; prefill
efficiency >= 0.8; small-batch ratio >= 0.9. Each configuration runs
`repeats` times, interleaved; the fastest repeat is reported and the spread
(slowest / fastest wall) recorded, with os.getloadavg(), since the machine is
shared. Rows go to bench/results/pipeline.jsonl.

    python -m bench.pipeline                 # the full run (a few minutes)
    python -m bench.pipeline --tiny --results-dir /tmp/x   # seconds (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.harness import append_results, environment, print_table

GOAL_BUSY, GOAL_PREFILL, GOAL_SMALL = 0.9, 0.8, 0.9


@dataclass(frozen=True, slots=True)
class Setup:
    """Model shape and workload of one run."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    prefill_prompts: int
    prefill_len: int
    chunk: int
    decode_seqs: int
    decode_tokens: int
    small_batches: tuple[int, ...]
    small_tokens: int
    repeats: int
    matmul_seconds: float  # per shape in the confounder loops

    def __post_init__(self):
        if self.layers < 2:
            raise ValueError(f"layers must be >= 2 to split into 2 stages, got {self.layers}")
        if self.decode_seqs < 2 or self.decode_seqs % 2:
            raise ValueError(f"decode_seqs must be even and >= 2 (two micro-batches), got {self.decode_seqs}")
        if self.chunk > self.prefill_len:
            raise ValueError(f"chunk {self.chunk} exceeds prefill_len {self.prefill_len}")

    @property
    def max_context(self) -> int:
        return max(self.prefill_len + 16, self.decode_tokens + 16, self.small_tokens + 16)


# vocab 1536 untied: the head is ~3% of a stage, so the 4/4 split stays balanced.
FULL = Setup(1024, 2816, 8, 16, 8, 64, 1536, 4, 1024, 256, 32, 48, (1, 4), 24, 2, 1.0)
TINY = Setup(64, 96, 2, 4, 2, 16, 320, 2, 48, 16, 8, 4, (1,), 3, 1, 0.05)


def write_checkpoint(path: Path, s: Setup, seed: int = 0) -> Path:
    """A random float32 qwen3 checkpoint of shape `s`: config.json + model.safetensors, named
    as Hugging Face names qwen3 tensors (QWEN.md). Written directly: importing transformers
    alone takes longer than the tiny run."""
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    H, I, q, kv = s.hidden, s.intermediate, s.heads * s.head_dim, s.kv_heads * s.head_dim

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    tensors = {"model.embed_tokens.weight": w(s.vocab, H), "model.norm.weight": torch.ones(H),
               "lm_head.weight": w(s.vocab, H)}
    for i in range(s.layers):
        p = f"model.layers.{i}."
        tensors |= {p + "input_layernorm.weight": torch.ones(H), p + "post_attention_layernorm.weight": torch.ones(H),
                    p + "self_attn.q_proj.weight": w(q, H), p + "self_attn.k_proj.weight": w(kv, H),
                    p + "self_attn.v_proj.weight": w(kv, H), p + "self_attn.o_proj.weight": w(H, q),
                    p + "self_attn.q_norm.weight": torch.ones(s.head_dim),
                    p + "self_attn.k_norm.weight": torch.ones(s.head_dim),
                    p + "mlp.gate_proj.weight": w(I, H), p + "mlp.up_proj.weight": w(I, H),
                    p + "mlp.down_proj.weight": w(H, I)}
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": H,
              "intermediate_size": I, "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
              "num_key_value_heads": s.kv_heads, "head_dim": s.head_dim, "vocab_size": s.vocab,
              "max_position_embeddings": max(4096, s.max_context), "rms_norm_eps": 1e-6, "rope_theta": 1e6,
              "rope_scaling": None, "hidden_act": "silu", "tie_word_embeddings": False,
              "attention_bias": False, "torch_dtype": "float32"}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


# ---- measuring one phase ----------------------------------------------------------


@dataclass(slots=True)
class DriverProbe:
    """Wraps an executor's submit/result (instance attributes) to time the driver's side."""

    submit_s: float = 0.0
    result_s: float = 0.0
    steps: int = 0

    def attach(self, executor) -> None:
        submit, result = executor.submit, executor.result

        def timed_submit(plan):
            t0 = time.perf_counter()
            submit(plan)
            self.submit_s += time.perf_counter() - t0
            self.steps += 1

        def timed_result():
            t0 = time.perf_counter()
            out = result()
            self.result_s += time.perf_counter() - t0
            return out

        executor.submit, executor.result = timed_submit, timed_result

    def snapshot(self) -> tuple[float, float, int]:
        return self.submit_s, self.result_s, self.steps


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass(slots=True)
class Counters:
    """Cumulative counters of a running LLM at one instant."""

    wall: float
    busy: list[float]
    wait: list[float]
    stage_steps: list[int]
    stage_cpu: list[float]
    driver_cpu: float
    submit_s: float
    result_s: float
    steps: int


class Runner:
    """One LLM (1 or 2 stages, one thread per stage) and its probes."""

    def __init__(self, model: Path, stages: int, s: Setup):
        from pprt import LLM

        self.stages = stages
        if stages == 1:
            torch.set_num_threads(1)
            self.llm = LLM(str(model), devices=["cpu"], chunk_size=s.chunk, max_context=s.max_context)
        else:
            with _stage_threads(1):
                self.llm = LLM(str(model), devices=["cpu"] * stages, split=_even_split(s.layers, stages),
                               chunk_size=s.chunk, max_context=s.max_context, transport="gloo")
        self.probe = DriverProbe()
        self.probe.attach(self.llm.executor)

    def counters(self) -> Counters:
        ex = self.llm.executor
        if self.stages == 1:
            w = ex.worker
            busy, wait, steps, cpu = [w.busy_seconds], [0.0], [self.probe.steps], [_self_cpu_s()]
        else:
            st = ex.stats()
            busy, wait, steps = [x.busy_seconds for x in st], [x.wait_seconds for x in st], [x.steps for x in st]
            cpu = [_proc_cpu_s(p.pid) for p in ex.procs]
        sub, res, n = self.probe.snapshot()
        return Counters(time.perf_counter(), busy, wait, steps, cpu, _self_cpu_s(), sub, res, n)

    def run(self, prompts: list[list[int]], max_tokens: int) -> dict:
        """Generate, and return the phase's figures (differences of counters around it)."""
        from pprt import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        load = os.getloadavg()[0]
        c0 = self.counters()
        outs = self.llm.generate(prompts, params)
        c1 = self.counters()
        if any(len(o.token_ids) != max_tokens for o in outs):
            raise RuntimeError(f"a completion stopped before max_tokens={max_tokens}")
        return phase_figures(c0, c1, self.stages, load)

    def close(self) -> None:
        self.llm.close()


def phase_figures(c0: Counters, c1: Counters, stages: int, load: float) -> dict:
    wall = c1.wall - c0.wall
    steps = c1.steps - c0.steps
    busy = [b1 - b0 for b0, b1 in zip(c0.busy, c1.busy)]
    wait = [w1 - w0 for w0, w1 in zip(c0.wait, c1.wait)]
    cpu = [x1 - x0 for x0, x1 in zip(c0.stage_cpu, c1.stage_cpu)]
    submit, result = c1.submit_s - c0.submit_s, c1.result_s - c0.result_s
    driver_cpu = c1.driver_cpu - c0.driver_cpu
    # 1 stage: the stage is this process, so its CPU time is the driver's
    cpu_s = driver_cpu if stages == 1 else sum(cpu) + driver_cpu
    row = {"stages": stages, "wall_s": wall, "steps": steps, "loadavg": load, "cpu_s": cpu_s,
           "drv_cpu_ms": 1e3 * driver_cpu / steps,
           "submit_ms": 1e3 * submit / steps, "loop_ms": 1e3 * (wall - submit - result) / steps,
           "overhead_ms": 1e3 * (wall - sum(busy)) / steps}
    for k in range(stages):
        row[f"busy_{k}"] = busy[k] / wall
        row[f"wait_{k}"] = wait[k] / wall
        row[f"cpu_{k}"] = cpu[k] / wall
    if stages == 2:
        row["xfer_ms"] = 1e3 * (wait[1] - busy[0]) / steps
    return row


@contextlib.contextmanager
def _stage_threads(n: int):
    """Start pipeline stages with `n` torch threads each (the executor's default is cpu_count // stages)."""
    from pprt.distributed import pipeline

    init = pipeline.PipelineExecutor.__init__

    def with_threads(self, *args, **kwargs):
        kwargs.setdefault("threads", n)
        init(self, *args, **kwargs)

    pipeline.PipelineExecutor.__init__ = with_threads
    try:
        yield
    finally:
        pipeline.PipelineExecutor.__init__ = init


def _even_split(layers: int, stages: int) -> list[int]:
    return [layers // stages + (i < layers % stages) for i in range(stages)]


# ---- confounders: two busy cores, micro-batch rows, gloo latency --------------------------


def matmul_gflops(rows: int, hidden: int, seconds: float) -> float:
    """GFLOP/s of [rows, H] @ [H, 3H] in a loop for about `seconds` (this process's threads)."""
    w = torch.randn(hidden, 3 * hidden)
    x = torch.randn(rows, hidden)
    for _ in range(3):
        x @ w
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds or n < 3:
        x @ w
        n += 1
    return 2 * rows * hidden * 3 * hidden * n / elapsed / 1e9


def _matmul_worker(rank: int, world: int, shapes, hidden: int, seconds: float, barrier, port: int, queue) -> None:
    torch.set_num_threads(1)
    out = {}
    for rows in shapes:
        barrier.wait()
        out[rows] = matmul_gflops(rows, hidden, seconds)
    if world == 2:  # gloo ping-pong of hidden states between the two processes
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        def ping_pong(buf: torch.Tensor, reps: int) -> None:
            for _ in range(reps):
                if rank == 0:
                    dist.send(buf, 1)
                    dist.recv(buf, 1)
                else:
                    dist.recv(buf, 0)
                    dist.send(buf, 0)

        for rows in shapes:
            buf, reps = torch.randn(rows, hidden), 30
            ping_pong(buf, 3)  # the first exchange also connects the pair
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            ping_pong(buf, reps)
            out[f"gloo_{rows}"] = (time.perf_counter() - t0) / reps / 2
            out[f"gloo_cpu_{rows}"] = (time.process_time() - c0) / reps  # this side: one send + one recv
        dist.destroy_process_group()
    queue.put((rank, out))


def parallel_matmul(world: int, shapes: tuple[int, ...], hidden: int, seconds: float) -> list[dict]:
    """Per-process results of the matmul loop run in `world` processes at once (barrier per shape)
    and, with 2, the gloo one-way latency of [rows, H] between them."""
    from pprt.distributed.comm import free_port

    ctx = mp.get_context("fork")  # no second torch import; run before this process's first matmul
    barrier, queue, port = ctx.Barrier(world), ctx.Queue(), free_port()
    procs = [ctx.Process(target=_matmul_worker, args=(r, world, shapes, hidden, seconds, barrier, port, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(10)
    return [results[r] for r in range(world)]


def confounders(s: Setup) -> dict:
    decode_rows = (s.decode_seqs // 2, s.decode_seqs)
    shapes = tuple(sorted({*decode_rows, s.chunk, 1, 2, 4}))
    torch.set_num_threads(1)
    pair = parallel_matmul(2, shapes, s.hidden, s.matmul_seconds)
    gflops = {r: matmul_gflops(r, s.hidden, s.matmul_seconds) for r in shapes}  # one process alone
    two_cores = {r: sum(p[r] for p in pair) / 2 / gflops[r] for r in shapes}
    return {"gflops": gflops, "two_cores": two_cores, "decode_rows": decode_rows,
            "gloo_us": {r: 1e6 * sum(p[f"gloo_{r}"] for p in pair) / 2 for r in shapes},
            "gloo_cpu_us": {r: 1e6 * sum(p[f"gloo_cpu_{r}"] for p in pair) / 2 for r in shapes}}


# ---- the run ----------------------------------------------------------------------------


@dataclass(slots=True)
class Workload:
    name: str
    prompts: list[list[int]]
    max_tokens: int
    in_flight_2: int  # micro-batches in flight on 2 stages
    tokens: int = field(init=False)

    def __post_init__(self):
        prefill = self.max_tokens == 1
        self.tokens = sum(len(p) for p in self.prompts) if prefill else len(self.prompts) * self.max_tokens


def workloads(s: Setup) -> list[Workload]:
    g = torch.Generator().manual_seed(1)

    def prompts(n: int, length: int) -> list[list[int]]:
        return torch.randint(0, s.vocab, (n, length), generator=g).tolist()

    out = [Workload("prefill", prompts(s.prefill_prompts, s.prefill_len), 1, 2),
           Workload("decode", prompts(s.decode_seqs, 1), s.decode_tokens, 2)]
    out += [Workload(f"small{b}", prompts(b, 1), s.small_tokens, min(b, 2)) for b in s.small_batches]
    return out


def run(s: Setup, results_dir: Path | None, label: str) -> list[dict]:
    torch.set_num_threads(1)  # the 1-stage run and the matmul loops: one core
    env = environment("cpu")
    jobs, control = workloads(s), Workload("control", [[1]], CONTROL_TOKENS, 1)
    raw: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="pprt-bench-") as tmp:
        t0 = time.perf_counter()
        model = write_checkpoint(Path(tmp) / "model", s)
        print(f"checkpoint written in {time.perf_counter() - t0:.1f}s; loadavg {os.getloadavg()}")
        conf = confounders(s)
        # control: 1 sequence through a tiny model, so a step is almost all control and transport
        groups = [(model, s, jobs + [control])] if label == "tiny" else [
            (write_checkpoint(Path(tmp) / "control", TINY), TINY, [control]), (model, s, jobs)]
        for path, setup, group in groups:
            with _runners(path, setup) as runners:
                for _ in range(s.repeats):  # interleaved, so drift in the machine's load hits both
                    for job in group:
                        _run_job(job, runners, raw)
    rows = summarize(s, [*jobs, control], raw, conf)
    columns = ["phase", "stages", "tok_s", "efficiency", "ratio", "expected", "pipe_eff", "fill_bound", "cpu_eff",
               "busy_0", "busy_1", "cpu_0", "cpu_1", "wait_1", "cpu_ms_tok", "drv_cpu_ms", "submit_ms", "loop_ms",
               "overhead_ms", "xfer_ms", "spread", "loadavg", "goal", "met"]
    print_table([r for r in rows if r["kind"] == "phase"], columns)
    print_table([r for r in rows if r["kind"] == "confounder"],
                ["rows", "gflops_1core", "two_cores", "gloo_us", "gloo_cpu_us"])
    path = append_results("pipeline", rows, {**env, "setup": label}, results_dir)
    print(f"appended {len(rows)} rows to {path}")
    return rows


CONTROL_TOKENS = 32


@contextlib.contextmanager
def _runners(model: Path, s: Setup):
    """A 1-stage and a 2-stage LLM over `model`, warmed up."""
    runners = {}
    try:
        for stages in (1, 2):
            runners[stages] = Runner(model, stages, s)
            runners[stages].run([[1, 2, 3]], 2)
        yield runners
    finally:
        for r in runners.values():
            r.close()


def _run_job(job: Workload, runners: dict, raw: dict) -> None:
    for stages, r in runners.items():
        raw.setdefault((job.name, stages), []).append(r.run(job.prompts, job.max_tokens))


def summarize(s: Setup, jobs: list[Workload], raw: dict, conf: dict) -> list[dict]:
    """Fastest repeat per configuration, with efficiency, the confounders and the goals."""
    rows = []
    for job in jobs:
        best = {}
        for stages in (1, 2):
            runs = raw[(job.name, stages)]
            walls = [r["wall_s"] for r in runs]
            best[stages] = {**min(runs, key=lambda r: r["wall_s"]), "spread": max(walls) / min(walls),
                            "repeats": len(runs)}
            best[stages]["tok_s"] = job.tokens / best[stages]["wall_s"]
            best[stages]["cpu_ms_tok"] = 1e3 * best[stages]["cpu_s"] / job.tokens
        ratio = best[2]["tok_s"] / best[1]["tok_s"]
        best[2]["cpu_eff"] = best[1]["cpu_ms_tok"] / best[2]["cpu_ms_tok"]
        for stages in (1, 2):
            row = {"kind": "phase", "phase": job.name, "tokens": job.tokens, "in_flight": 1 if stages == 1
                   else job.in_flight_2, **best[stages]}
            if row["in_flight"] >= 2:  # overlapped: wall - busy is not a per-step overhead
                row.pop("overhead_ms")
                row.pop("xfer_ms", None)
            if stages == 2:
                rows.append(_goals(row, job, ratio, s, conf))
            else:
                rows.append(row)
    for r in conf["gflops"]:
        rows.append({"kind": "confounder", "rows": r, "hidden": s.hidden, "gflops_1core": conf["gflops"][r],
                     "two_cores": conf["two_cores"][r], "gloo_us": conf["gloo_us"][r],
                     "gloo_cpu_us": conf["gloo_cpu_us"][r]})
    return rows


def _goals(row: dict, job: Workload, ratio: float, s: Setup, conf: dict) -> dict:
    if job.name == "control":
        row.update(ratio=ratio)
        return row
    if job.name.startswith("small"):
        row.update(ratio=ratio, goal=f"ratio>={GOAL_SMALL}", met=ratio >= GOAL_SMALL)
        return row
    rows_2, rows_1 = (s.chunk, s.chunk) if job.name == "prefill" else conf["decode_rows"]
    rows_eff = conf["gflops"][rows_2] / conf["gflops"][rows_1]
    expected = conf["two_cores"][rows_2] * rows_eff
    eff = ratio / 2
    busy_ok = min(row["busy_0"], row["busy_1"]) >= GOAL_BUSY
    goal, met = f"busy>={GOAL_BUSY}", busy_ok
    if job.name == "prefill":
        goal, met = goal + f",eff>={GOAL_PREFILL}", busy_ok and eff >= GOAL_PREFILL
    # fill and drain: each stage idles one micro-batch's time while the other runs the first / last one
    fill_bound = row["steps"] / (row["steps"] + 1)
    row.update(efficiency=eff, two_cores=conf["two_cores"][rows_2], rows_eff=rows_eff, expected=expected,
               fill_bound=fill_bound,
               pipe_eff=eff / expected, goal=goal, met=met)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model and workload (seconds; for tests)")
    ap.add_argument("--repeats", type=int, help="repeats per configuration (fastest is reported)")
    ap.add_argument("--results-dir", type=Path, help="where pipeline.jsonl goes (default bench/results)")
    args = ap.parse_args(argv)
    s = TINY if args.tiny else FULL
    if args.repeats:
        import dataclasses

        s = dataclasses.replace(s, repeats=args.repeats)
    run(s, args.results_dir, "tiny" if args.tiny else "full")


if __name__ == "__main__":
    main()
