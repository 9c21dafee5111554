"""CheckpointLayout: where each of a Stage's parameters lives in one checkpoint.

A Stage names its parameters canonically (`model.layers.{i}...`,
`model.embed_tokens.weight`, `lm_head.weight`; experts one MLP each:
`mlp.experts.{e}.gate_proj.weight`). Checkpoints differ, and the layout is read
from the checkpoint's tensor names, never assumed from the model family
(shared/QWEN.md section 7; exports of each layout exist for each family):

- prefix: a multimodal Qwen3.5 release (`Qwen3_5ForConditionalGeneration`) keeps
  the text model under `model.language_model.` (its `model.visual.*` tensors are
  never read); flat exports under `model.`. `lm_head.weight` and the MTP head's
  `mtp.*` (read only when MTP drafting is on) are at the top in both.
- experts (of `model.layers.{i}` and of the MTP head's `mtp.layers.{i}`): per
  expert (`mlp.experts.{e}.{gate,up,down}_proj.weight`), or fused
  (`mlp.experts.gate_up_proj` [E, 2I, H], gate rows first, and
  `mlp.experts.down_proj` [E, H, I], no `.weight` suffix); an expert's weights are
  then contiguous parts of those tensors, read alone (pprt.weights.checkpoint.TensorPart).
  Fused tensors stored in float8 carry block scales beside them (`gate_up_proj_scale_inv`;
  formats.py and fp8.load_fp8_rows read them). The official Qwen3.5/3.6 MoE FP8 releases
  store experts per expert, with `weight_scale_inv` each, like any FP8 linear.
  The transposed fused layout of Qwen3-VL-MoE ([E, H, 2I]) is refused by name.

Knows nothing of reading bytes or of model math.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from ..config import ModelConfig
from ..errors import CheckpointError
from .checkpoint import TensorPart

MULTIMODAL_PREFIX = "model.language_model."
_EXPERT = re.compile(r"^((?:model|mtp)\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class CheckpointLayout:
    """Maps canonical tensor names onto one checkpoint's names (see the module docstring)."""

    def __init__(self, config: ModelConfig, names: Collection[str]):
        self.config = config
        self._names = names
        multimodal = f"{MULTIMODAL_PREFIX}embed_tokens.weight" in names or any(
            n.startswith(MULTIMODAL_PREFIX) for n in names)
        self.prefix = MULTIMODAL_PREFIX if multimodal else "model."

    def name(self, canonical: str) -> str:
        """The checkpoint's name for canonical tensor `canonical` (`model.` prefix rewritten)."""
        if canonical.startswith("model."):
            return self.prefix + canonical.removeprefix("model.")
        return canonical

    def source(self, canonical: str) -> TensorPart:
        """Where parameter `canonical` is stored: a whole tensor, or a part of a fused one."""
        m = _EXPERT.match(canonical)
        if m is not None:
            experts, e, proj = m[1], int(m[2]), m[3]
            fused = self.name(f"{experts}.gate_up_proj")
            if fused in self._names:
                I = self.config.moe_intermediate_size
                if proj == "down_proj":
                    return TensorPart(self.name(f"{experts}.down_proj"), (e,))
                return TensorPart(fused, (e,), (0, I) if proj == "gate_proj" else (I, 2 * I))
        return TensorPart(self.name(canonical))

    def check_fused(self, part: TensorPart, shape: tuple[int, ...]) -> None:
        """Refuse a fused expert tensor that is not [E, 2I, H] / [E, H, I] (e.g. Qwen3-VL-MoE's
        transpose)."""
        c = self.config
        E, I, H = c.num_experts, c.moe_intermediate_size, c.hidden_size
        expected = {"gate_up_proj": (E, 2 * I, H), "down_proj": (E, H, I)}.get(part.name.rpartition(".")[2])
        if part.index and expected is not None and tuple(shape) != expected:
            raise CheckpointError(f"fused expert tensor {part.name!r} has shape {list(shape)}, expected "
                                  f"{list(expected)} ([experts, out, in]; a transposed layout is not supported)")
