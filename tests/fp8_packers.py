"""Test-side writer of official block-wise FP8 tensors, independent of pprt.weights.fp8.

`fp8_block_quantize(w, block)` quantizes a float weight [N, K] block by block with
explicit loops (the last blocks partial when N or K is not a multiple of the block):
scale = max|w| / 448 over the block (1 for a block of zeros), weight = e4m3 of
w / scale by torch's own float8_e4m3fn cast. Returns the stored tensors (`weight`
float8_e4m3fn [N, K], `weight_scale_inv` float32 [ceil(N/bn), ceil(K/bk)]) and the
dequantized weight by the published formula W = weight * scale of its block, which
is the oracle of the end-to-end checks (shared/QWEN.md section 8).
"""

from __future__ import annotations

import torch


def fp8_block_quantize(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[dict, torch.Tensor]:
    n, k = weight.shape
    bn, bk = block
    w = weight.float()
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    deq = torch.empty(n, k)
    scales = torch.empty(-(-n // bn), -(-k // bk))
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            rows, cols = slice(i * bn, (i + 1) * bn), slice(j * bk, (j + 1) * bk)
            amax = w[rows, cols].abs().max().item()
            s = amax / 448.0 if amax > 0 else 1.0
            scales[i, j] = s
            s = scales[i, j].item()  # the float32 value the file stores
            q[rows, cols] = (w[rows, cols] / s).clamp(-448, 448).to(torch.float8_e4m3fn)
            deq[rows, cols] = q[rows, cols].float() * s
    return {"weight": q, "weight_scale_inv": scales}, deq


def fp8_block_quantize_fused(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[dict, torch.Tensor]:
    """A fused expert tensor [E, N, K] (e.g. `gate_up_proj` [E, 2I, H]) quantized expert by expert over
    its joined rows, as transformers' FP8Experts stores it: `weight` float8_e4m3fn [E, N, K] and
    `scale_inv` float32 [E, ceil(N/bn), ceil(K/bk)] (a block may span gate's last rows and up's first).
    Returns the stored tensors (keys "weight", "scale_inv") and the dequantized [E, N, K]."""
    parts = [fp8_block_quantize(w, block) for w in weight]
    stored = {"weight": torch.stack([p[0]["weight"] for p in parts]),
              "scale_inv": torch.stack([p[0]["weight_scale_inv"] for p in parts])}
    return stored, torch.stack([p[1] for p in parts])
