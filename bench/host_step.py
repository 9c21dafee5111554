"""Host work of one decode step, measured on the CPU (no model): what does not grow with the model's size.

Three parts of a step run on the host whatever the device:

- `tables`: a stage turns the step plan into its step tensors (positions,
  slots, block tables, query offsets, context lengths) for B sequences at a
  context of L tokens, in steady decode and in a step where every sequence
  gains a block (on CPU this includes gathering the [B, L / 16] block tables,
  which a GPU does on the device);
- `schedule`: the driver plans the micro-batches of a step and applies their
  results (`Scheduler.schedule` + `complete`) with N sequences running, in
  `depth` groups (one per pipeline stage);
- `sampler`: one batched `Sampler.sample` of B rows over a Qwen vocabulary
  (151936): the kernel launches and host syncs it would issue on a GPU
  (bench/counting.py) and its CPU time, for greedy rows, Qwen's default
  sampling (temperature, top_k, top_p), repetition penalty and seeded rows.

CPU milliseconds are host time only where no device work hides behind them
(tables, schedule); the sampler's CPU time includes its math. Rows go to
bench/results/host_step.jsonl.

    python -m bench.host_step            # the sizes of issue 18
    python -m bench.host_step --tiny     # seconds
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.counting import count_ops
from bench.harness import append_results, environment, print_table
from pprt.distributed.step import SeqChunk, StepPlan, StepResult
from pprt.engine.blocks import BlockManager
from pprt.engine.scheduler import Scheduler
from pprt.models.sampler import Sampler
from pprt.params import SamplingParams

BLOCK = 16
VOCAB = 151936


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


# ---- tables ------------------------------------------------------------------------------------------------

def _step_tensors(batch: int, context: int):
    """A function building one decode step's tensors (returns it and a plan maker)."""
    from pprt.distributed.step_inputs import StepInputs

    blocks = context // BLOCK
    inputs = StepInputs("cpu", BLOCK, blocks + 1)
    prefill = StepPlan(0, [SeqChunk(s, [1] * 1, 0, 0, list(range(s * blocks, (s + 1) * blocks)), True)
                           for s in range(batch)])
    inputs.build(prefill)  # every sequence now holds `blocks` blocks

    def plan(pos: int, gain: bool) -> StepPlan:
        return StepPlan(1, [SeqChunk(s, [7], pos, blocks if gain else blocks + (pos >= context),
                                     [batch * blocks + s] if gain else [], True) for s in range(batch)])

    return inputs.build, plan


def bench_tables(batch: int, context: int, repeats: int) -> list[dict]:
    build, plan = _step_tensors(batch, context)
    steady = plan(context - 2, gain=False)
    gain = plan(context, gain=True)
    return [{"part": "tables", "case": "decode", "B": batch, "context": context,
             "ms": _median_ms(lambda: build(steady), repeats)},
            {"part": "tables", "case": "gain a block", "B": batch, "context": context,
             "ms": _median_ms(lambda: build(gain), repeats)}]


# ---- schedule -----------------------------------------------------------------------------------------------

def bench_schedule(running: int, depth: int, steps: int) -> dict:
    blocks = BlockManager(running * 64, BLOCK)
    sched = Scheduler(blocks, max_context=4096, chunk_size=8192, max_num_seqs=running)
    params = SamplingParams(max_tokens=10**6, temperature=0, ignore_eos=True).resolve()
    seqs = {}
    for i in range(running):
        seqs[i] = sched.add([1, 2, 3, 4], params)
    group = -(-running // depth)
    in_flight = []

    def one_step():
        while len(in_flight) < depth:
            p = sched.schedule(max_seqs=group)
            if p is None:
                break
            in_flight.append(p)
        p = in_flight.pop(0)
        ids = [c.seq_id for c in p.chunks if c.sample]
        sched.complete(p, StepResult(p.step, ids, [5] * len(ids)), seqs)

    for _ in range(2 * depth):  # prefill, then decode
        one_step()
    ms = _median_ms(one_step, steps)
    return {"part": "schedule", "case": f"depth {depth}", "B": group, "running": running, "ms": ms}


# ---- sampler ------------------------------------------------------------------------------------------------

SAMPLER_CASES = {
    "greedy": lambda i: SamplingParams(temperature=0),
    "qwen defaults": lambda i: SamplingParams(temperature=0.7, top_k=20, top_p=0.8),
    "repetition 1.05": lambda i: SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05),
    "8 of 32 seeded": lambda i: SamplingParams(temperature=0.7, top_k=20, top_p=0.8, seed=i if i % 4 == 0 else None),
}


def bench_sampler(batch: int, vocab: int, repeats: int) -> list[dict]:
    rows = []
    for case, make in SAMPLER_CASES.items():
        sampler = Sampler(vocab, "cpu", seed=0)
        for i in range(batch):
            sampler.add(i, make(i).resolve(), list(range(i, i + 64)))
        logits = torch.randn(batch, vocab)
        ids = list(range(batch))
        with count_ops() as counts:
            sampler.sample(ids, logits)
        rows.append({"part": "sampler", "case": case, "B": batch, "launches": counts.launches,
                     "syncs": counts.syncs, "ms": _median_ms(lambda: sampler.sample(ids, logits), repeats)})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small sizes (a dry run)")
    ap.add_argument("--results-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # host work is one thread's
    try:
        if args.tiny:
            rows = bench_tables(8, 1024, 3) + [bench_schedule(16, 2, 5)] + bench_sampler(4, 1000, 2)
        else:
            rows = (bench_tables(128, 32768, 20) + bench_tables(8, 4096, 50)
                    + [bench_schedule(256, 1, 30), bench_schedule(256, 4, 30)] + bench_sampler(32, VOCAB, 5))
    finally:
        torch.set_num_threads(threads)
    print_table(rows, ["part", "case", "B", "context", "running", "launches", "syncs", "ms"])
    append_results("host_step", rows, environment("cpu") | {"tiny": args.tiny}, args.results_dir)
    return rows


if __name__ == "__main__":
    main()
