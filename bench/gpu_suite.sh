#!/usr/bin/env bash
# One command for a machine with one GPU, finishing in under 5 minutes (SUITE_BUDGET_S, 290 s), so a
# 15-minute lease has room for the machine's start and a rerun:
#   1. env          the card, driver, python, torch, triton
#   2. ceilings     copy bandwidth and bf16 matmul rate    (python -m bench.harness)
#   3. gpu-tests    kernel correctness with Triton compiled for real (the kernel test files,
#                   and every test marked `gpu`)
#   4. int4-bench   python -m bench.int4_matmul             (Qwen2.5-72B / Qwen3-32B layer shapes)
#   5. fp8-bench    python -m bench.fp8_matmul              (W8A16 vs cuBLAS bf16, Qwen3.5-27B / 122B-A10B shapes)
#   6. attn-bench   python -m bench.attention               (paged decode / prefill)
#   6b. delta-bench python -m bench.gated_delta             (Gated DeltaNet: gated delta rule and conv1d,
#                   decode against the state bytes moved, prefill fla vs our recurrent kernel)
#   6c. moe-bench   python -m bench.fused_moe               (one MoE layer, Qwen3-30B-A3B / Qwen3.5-35B-A3B
#                   shapes, 1/8/32 tokens: reference, Triton bf16 and Int4, torch grouped_mm)
#   6d. prefix-bench python -m bench.prefix_cache         (second chat turn's first token after a 4k shared
#                   prefix, with and without prefix caching; Qwen2.5-7B geometry cut to 4 layers)
#   7. generate     python -m bench.generate: decode at batch 1, 8 and 32 with CUDA graphs and
#                   eager (--graphs on,off), on 4 layers of a Qwen3-30B-A3B-shaped model (fused MoE)
#                   with random weights, against the roofline of the bytes a step reads; it gets
#                   whatever time the parts before it left (GENERATE_ARGS replaces its arguments,
#                   e.g. the Qwen2.5-7B, Qwen3-32B-shaped runs of issue 18 with a larger budget)
#   8. a summary table, printed last
# Each part runs under `timeout`; a part that fails or runs out of time is reported and the
# others go on. JSON rows are appended to bench/results/ (RESULTS_DIR); each part's log goes
# to LOG_DIR (default: a temp dir, or $OUT when set). Exit status: the number of failed parts.
#
#   bash bench/gpu_suite.sh            # on the GPU machine, from the repository root
#   bash bench/gpu_suite.sh --tiny     # CPU dry run of the plumbing (tiny sizes, no tests)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TINY=0
[[ "${1:-}" == "--tiny" ]] && TINY=1
PY=${PYTHON:-python3}
# A --tiny dry run on a CPU interprets the Triton kernels: its parts get 3x the time (and the budget).
SCALE=1
((TINY)) && SCALE=3
BUDGET=${SUITE_BUDGET_S:-$((290 * SCALE))}
# A --tiny dry run writes its (meaningless) rows to a temporary folder, not bench/results/.
if ((TINY)); then RESULTS_DIR=${RESULTS_DIR:-$(mktemp -d -t pprt-tiny-results-XXXX)}
else RESULTS_DIR=${RESULTS_DIR:-$ROOT/bench/results}; fi
LOG_DIR=${LOG_DIR:-${OUT:-$(mktemp -d -t pprt-suite-XXXX)}}
mkdir -p "$RESULTS_DIR" "$LOG_DIR"
export PYTHONUNBUFFERED=1
SUITE_START=$(date +%s)
SUITE_DATE=$(date -u +%Y-%m-%dT%H:%M:%S+00:00)

# `kernels/` is imported as pprt_kernels; without an installed package, a link on PYTHONPATH.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import pprt_kernels" 2>/dev/null; then
    SHIM=$(mktemp -d -t pprt-path-XXXX)
    ln -s "$ROOT/kernels" "$SHIM/pprt_kernels"
    export PYTHONPATH="$PYTHONPATH:$SHIM"
fi

PARTS=()
STATUS=()
SECONDS_USED=()
FAILED=0

remaining() { echo $((BUDGET - ($(date +%s) - SUITE_START))); }

# part NAME LIMIT_S COMMAND...: run COMMAND time-boxed, log to LOG_DIR/NAME.log, record status.
part() {
    local name=$1 limit=$(($2 * SCALE))
    shift 2
    local left
    left=$(remaining)
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        PARTS+=("$name"); STATUS+=("skipped (suite budget spent)"); SECONDS_USED+=(0)
        FAILED=$((FAILED + 1))
        echo "== $name: skipped, the suite's ${BUDGET} s are spent"
        return
    fi
    echo "== $name (limit ${limit} s): $*"
    local t0 rc
    t0=$(date +%s)
    # shell functions reach `timeout` through an exported copy in a child bash
    timeout --signal=TERM --kill-after=15 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
    rc=${PIPESTATUS[0]}
    local used=$(($(date +%s) - t0)) status
    if ((rc == 0)); then
        status=ok
    elif ((rc == 124 || rc == 137)); then
        status="TIMEOUT after ${limit} s"
    else
        status="FAILED (exit $rc)"
    fi
    ((rc != 0)) && FAILED=$((FAILED + 1))
    PARTS+=("$name"); STATUS+=("$status"); SECONDS_USED+=("$used")
    echo "== $name: $status in ${used} s"
}

env_info() {
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PY" - <<'EOF'
import platform, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
try:
    from importlib.metadata import version; fla = version("fla-core")
except Exception:
    fla = "not installed (pip install 'pprt[gpu]')"
print(f"python {platform.python_version()}, torch {torch.__version__}, triton {tv}, fla-core {fla}, "
      f"cuda available {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
EOF
}

gpu_tests() {
    local files=()
    for f in tests/test_paged_attention.py tests/test_int4_matmul.py tests/test_fp8_matmul.py \
        tests/test_gated_delta_triton.py tests/test_causal_conv1d.py tests/test_kernel_launchers.py \
        tests/test_fused_moe.py tests/test_sampler_step.py tests/test_norm_rotary_kernels.py; do
        [[ -f $f ]] && files+=("$f")
    done
    "$PY" -m pytest -q -p no:cacheprovider -m "not slow" "${files[@]}" || return $?
    if grep -lq "mark.gpu" tests/*.py; then
        "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/
    fi
}

generate_bench() {
    local left budget work=()
    left=$(remaining)
    budget=$((left - 15))  # generate skips a setup that would end past it
    # random weights in memory when /dev/shm has room (the 7B checkpoint is ~15 GB)
    if [[ -d /dev/shm ]] && (($(df -Pk /dev/shm | awk 'NR==2 {print $4}') > 40 * 1024 * 1024)); then
        work=(--work-dir /dev/shm)
    fi
    if ((TINY)); then
        "$PY" -m bench.generate --tiny --results-dir "$RESULTS_DIR" --time-budget "$budget"
    elif [[ -n "${GENERATE_ARGS:-}" ]]; then
        # shellcheck disable=SC2086  # word splitting is the point
        "$PY" -m bench.generate $GENERATE_ARGS --time-budget "$budget" --results-dir "$RESULTS_DIR" "${work[@]}"
    else
        "$PY" -m bench.generate --config qwen3-30b-a3b --layers 4 --stages 1 --engines pprt --weights bf16 \
            --graphs on,off --prompts 512 --batches 1,8,32 --decode-prompt 512 --decode-tokens 32 --repeats 1 \
            --time-budget "$budget" --results-dir "$RESULTS_DIR" "${work[@]}"
    fi
}

export PY TINY BUDGET RESULTS_DIR SUITE_START SCALE
export -f remaining env_info gpu_tests generate_bench
TINY_FLAG=()
ROWS=(--ms 1 8 32 256)  # the matmul benches' row counts: decode sizes and one prefill-sized
((TINY)) && TINY_FLAG=(--tiny) && ROWS=()
part env 15 env_info
part ceilings 20 "$PY" -m bench.harness "${TINY_FLAG[@]}" --results-dir "$RESULTS_DIR"
if ((TINY)); then
    PARTS+=(gpu-tests); STATUS+=("skipped (--tiny)"); SECONDS_USED+=(0)
else
    part gpu-tests 75 gpu_tests
fi
if [[ -f bench/int4_matmul.py ]]; then
    part int4-bench 25 "$PY" -m bench.int4_matmul "${TINY_FLAG[@]}" "${ROWS[@]}" --results-dir "$RESULTS_DIR"
fi
if [[ -f bench/fp8_matmul.py ]]; then
    part fp8-bench 25 "$PY" -m bench.fp8_matmul "${TINY_FLAG[@]}" "${ROWS[@]}" --results-dir "$RESULTS_DIR"
fi
part attn-bench 20 "$PY" -m bench.attention "${TINY_FLAG[@]}" --results-dir "$RESULTS_DIR"
if [[ -f bench/gated_delta.py ]]; then
    part delta-bench 25 "$PY" -m bench.gated_delta "${TINY_FLAG[@]}" --results-dir "$RESULTS_DIR"
fi
part moe-bench 30 "$PY" -m bench.fused_moe "${TINY_FLAG[@]}" --results-dir "$RESULTS_DIR"
if ((TINY)); then
    part prefix-bench 20 "$PY" -m bench.prefix_cache --tiny --stages 1 --results-dir "$RESULTS_DIR"
else
    part prefix-bench 40 "$PY" -m bench.prefix_cache --config qwen2.5-7b --layers 4 --stages 1 --prefix 4096 \
        --repeats 2 --results-dir "$RESULTS_DIR"
fi
part generate 300 generate_bench

echo
echo "================ summary ($(($(date +%s) - SUITE_START)) s; logs in $LOG_DIR) ================"
for i in "${!PARTS[@]}"; do
    printf "%-12s %5s s  %s\n" "${PARTS[$i]}" "${SECONDS_USED[$i]}" "${STATUS[$i]}"
done
grep -h -E "^[0-9]+ (passed|failed)|(passed|failed|error).* in [0-9.]+s" "$LOG_DIR/gpu-tests.log" 2>/dev/null | tail -2
"$PY" - "$RESULTS_DIR" "$SUITE_DATE" <<'EOF'
"""This run's numbers, from the JSON rows the parts appended."""
import json, sys
from pathlib import Path

from bench.harness import print_table

results, since = Path(sys.argv[1]), sys.argv[2]


def rows(name):
    path = results / f"{name}.jsonl"
    if not path.exists():
        return []
    out = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in out if r.get("date", "") >= since]


def num(x):
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


for r in rows("ceilings"):
    if r["kind"] == "copy":
        print(f"{r['device']}: copy {r['GBps']:.0f} GB/s (read + write)", end="")
    else:
        print(f", {r['dtype']} matmul {r['TFLOPs']:.3g} TFLOP/s (n = {r['n']})")
int4 = rows("int4_matmul")
if int4:
    fr = [num(r.get("frac_copy_bw")) for r in int4 if r.get("M", 1 << 30) <= 16]
    fr = [f for f in fr if f is not None]
    met = [r.get("goal_met") for r in int4 if isinstance(r.get("goal_met"), bool)]
    print(f"int4_matmul: {len(int4)} rows; M <= 16 fraction of copy bandwidth "
          f"{min(fr):.2f}..{max(fr):.2f}" if fr else f"int4_matmul: {len(int4)} rows", end="")
    print(f"; goals met {sum(met)}/{len(met)}" if met else "")
fp8 = rows("fp8_matmul")
if fp8:
    fr = [num(r.get("frac_copy_bw")) for r in fp8 if r.get("M", 1 << 30) <= 16]
    fr = [f for f in fr if f is not None]
    sp = [num(r.get("speedup_vs_bf16")) for r in fp8 if r.get("M", 1 << 30) <= 16]
    sp = [f for f in sp if f is not None]
    met = [r.get("goal_met") for r in fp8 if isinstance(r.get("goal_met"), bool)]
    print(f"fp8_matmul: {len(fp8)} rows" + (f"; M <= 16 fraction of copy bandwidth {min(fr):.2f}..{max(fr):.2f}, "
          f"speedup vs bf16 {min(sp):.2f}..{max(sp):.2f}x" if fr and sp else "")
          + (f"; goals met {sum(met)}/{len(met)}" if met else ""))
attn = rows("attention")
if attn:
    met = [r.get("goal_met") for r in attn if isinstance(r.get("goal_met"), bool)]
    fr = [r["frac_copy"] for r in attn if r.get("kind") == "decode" and num(r.get("frac_copy"))]
    print(f"attention: {len(attn)} rows; decode fraction of copy bandwidth up to {max(fr, default=0):.2f}; "
          f"goals met {sum(met)}/{len(met)}")
delta = rows("gated_delta")
if delta:
    met = [r.get("goal_met") for r in delta if isinstance(r.get("goal_met"), bool)]
    fr = [r["frac_copy"] for r in delta if r.get("kind") == "decode" and r.get("op") == "gated_delta"]
    vs = [f"{r['rows']}: {r['vs_recurrent']:.2g}x" for r in delta
          if r.get("op") == "gated_delta" and r.get("kind") == "prefill" and num(r.get("vs_recurrent"))]
    print(f"gated_delta: {len(delta)} rows; decode fraction of copy bandwidth up to {max(fr, default=0):.2f}; "
          f"prefill vs our recurrent kernel {', '.join(vs) or '-'}; goals met {sum(met)}/{len(met)}")
moe = rows("fused_moe")
if moe:
    print("fused_moe (per MoE layer):")
    print_table(moe, ["model", "weights", "path", "tokens", "launches", "syncs", "ms", "GBps", "frac_copy_bw",
                      "rel_err"])
pc = rows("prefix_cache")
if pc:
    print("prefix_cache (second turn after a shared prefix): " + "; ".join(
        f"{r['stages']} stage(s) {'cached' if r['caching'] else 'uncached'} ttft {r['ttft_s']:.3g} s"
        + (f" ({r['speedup']:.2f}x, token ratio {r['token_ratio']:.1f})" if r.get("speedup") else "") for r in pc))
gen = rows("generate")
if gen:
    for r in gen:
        r["size"] = r.get("prompt_len") or r.get("batch")
        if r["kind"] == "load":
            mem = {k: v for k, v in r.get("peak_mem_gb", {}).items() if num(v)}
            dev = [v for k, v in mem.items() if k.startswith("cuda") and " " not in k]  # device memory used
            r["peak_gb"] = max(dev or mem.values(), default=None)  # else: the largest peak RSS
        if r.get("error"):
            r["note"] = r["error"][:60]
    print(f"generate ({gen[0].get('model')}, copy {gen[0].get('copy_GBps', 0):.0f} GB/s):")
    print_table(gen, ["engine", "weights", "stages", "graphs", "kind", "size", "load_s", "ttft_s", "tok_s",
                      "vs_hf", "frac_roofline", "peak_gb", "note"])
EOF
exit "$FAILED"
