"""LoRA on a MoE layer's routed experts: PEFT's two layouts of them, read as one.

1. Per-expert modules (transformers 4 built each expert as nn.Linear modules):
   `<moe>.experts.{e}.gate_proj|up_proj|down_proj` with lora_A [r, in], lora_B [out, r]
   each, like any linear (pprt.weights.lora checks them against the meta model's experts).
2. Fused parameters through `target_parameters` (transformers 5 holds each MoE layer's
   experts as `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]): PEFT's ParamWrapper
   (peft/tuners/lora/layer.py) reads a 3-D parameter [E, d1, d2] as in_features = d2,
   out_features = d1 (the "not is_transposed" order) and keeps
       lora_A: nn.Linear(in, r * E)  -> weight [r*E, in], expert-major: expert e's A is rows e*r .. e*r + r
       lora_B: nn.Linear(r * E, out) -> weight [out, r*E], rank-major: expert e's B is columns e, e + E, ...
   (`get_delta_weight`: A.reshape(E, r, in), B.reshape(out, r, E); delta[e] = scale * B_e A_e [out, in]).
   The tensors' names do not say the parameter: each targeted parameter of one module
   wraps the previous one, in the module's parameter order (gate_up_proj, then down_proj),
   so the last is `<moe>.experts.lora_A.weight` and the one before it
   `<moe>.experts.base_layer.lora_A.weight`. PEFT matches target_parameters by name alone
   (`layers_to_transform` does not apply to them).

Both become, per MoE layer and projection, stacks A [E, r, in] and scale * B [E, out, r]
(`fused_tensors`, `per_expert_stack`) under the names `<moe>.experts.<proj>` (proj:
gate_proj, up_proj, down_proj or gate_up_proj). Knows nothing of files or of how the
deltas are applied (pprt.models.lora, pprt_kernels.moe_lora).
"""

from __future__ import annotations

import re

import torch

from ..config import ModelConfig
from ..errors import CheckpointError

PARAMS = ("gate_up_proj", "down_proj")  # transformers' fused expert parameters, in registration order
_MOE = re.compile(r"^(.*\.mlp)\.experts\.0\.gate_proj$")
_WRAPPED = re.compile(r"^(?P<experts>.+\.mlp\.experts)(?P<nest>(?:\.base_layer)*)$")


def fused_params(config: ModelConfig, linears: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """{`<moe>.experts.gate_up_proj` / `.down_proj`: (in_features, out_features)} of every MoE layer, from
    the meta model's linears (whose first expert's gate_proj marks an MoE layer)."""
    H, I = config.hidden_size, config.moe_intermediate_size
    out = {}
    for name in linears:
        m = _MOE.match(name)
        if m:
            out[f"{m[1]}.experts.gate_up_proj"] = (H, 2 * I)
            out[f"{m[1]}.experts.down_proj"] = (I, H)
    return out


def selected_params(where: str, spec, candidates: set[str], spellings) -> set[str]:
    """The parameters among `candidates` (fused expert parameters, `<linear>.weight`s) that
    `target_parameters` selects (PEFT's rule: the name or its last components). Raises
    CheckpointError naming an entry that selects none of them."""
    if not spec:
        return set()
    if isinstance(spec, str):
        spec = [spec]
    chosen = set()
    for entry in spec:
        hit = {p for p in candidates if any(n == entry or n.endswith("." + entry) for n in spellings(p))}
        if not hit:
            raise CheckpointError(f"{where}: target_parameters entry {entry!r} selects no parameter pprt adapts "
                                  "(the fused experts' mlp.experts.gate_up_proj / mlp.experts.down_proj, or a "
                                  "linear layer's weight)")
        chosen |= hit
    return chosen


def param_of(where: str, key: str, module: str, chosen: set[str]) -> str | None:
    """The fused parameter a file's `<moe>.experts(.base_layer)*` tensor adapts, or None when `module`
    is not such a wrapper. Raises CheckpointError when target_parameters select no parameter at that depth."""
    m = _WRAPPED.match(module)
    if m is None:
        return None
    order = [f"{m['experts']}.{p}" for p in PARAMS if f"{m['experts']}.{p}" in chosen]  # innermost first
    depth = m["nest"].count(".base_layer")
    if depth >= len(order):
        raise CheckpointError(f"{where}: tensor {key!r} adapts a parameter of {m['experts']!r}, but "
                              f"target_parameters select {len(order)} of its parameters "
                              f"({', '.join(p.rpartition('.')[2] for p in order) or 'none'})")
    return order[len(order) - 1 - depth]


def fused_tensors(a: torch.Tensor, b: torch.Tensor, experts: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r*E, in] and B [out, r*E] of a fused parameter as A [E, r, in] and B [E, out, r]."""
    return (a.reshape(experts, rank, a.shape[1]),
            b.reshape(b.shape[0], rank, experts).permute(2, 0, 1).contiguous())


def per_expert_stack(parts: dict[int, tuple[torch.Tensor, torch.Tensor]], experts: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """{expert: (A [r_e, in], B [out, r_e])} as A [E, r, in] and B [E, out, r], r the largest r_e;
    experts absent and ranks short of r are zeros (no delta)."""
    a0, b0 = next(iter(parts.values()))
    rank = max(a.shape[0] for a, _ in parts.values())
    a_stack = a0.new_zeros(experts, rank, a0.shape[1])
    b_stack = b0.new_zeros(experts, b0.shape[0], rank)
    for e, (a, b) in parts.items():
        a_stack[e, : a.shape[0]] = a
        b_stack[e, :, : b.shape[1]] = b
    return a_stack, b_stack
