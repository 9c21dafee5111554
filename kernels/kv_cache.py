"""Writing a step's keys and values into a paged KV cache, and the fp8 cache's scales.

Cache layout (one layer of one stage; pprt_kernels.paged_attention reads it):
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
token t of a sequence lives at slot `block_table[t // block_size] * block_size + t % block_size`.

fp8 cache. k_cache/v_cache may be torch.float8_e4m3fn; `write_kv` quantizes,
attention dequantizes on the fly. Scales (`k_scale`, `v_scale`, float32):
    None                       plain saturating cast (scale 1);
    one element                static per-tensor scale, stored = x / scale;
    [num_blocks, block_size, num_kv_heads]
                               one scale per (slot, kv head), set by write_kv
                               to amax(|x| over head_dim) / 448.
The per-(slot, head) form is the recommended one (`new_kv_scales`): it needs
no calibration (HF Qwen checkpoints ship no KV scales, and Qwen2's biased keys
vary in range by orders of magnitude across heads), every vector uses the
full e4m3 range, and it costs 4 bytes per head_dim bytes (3% at 128) plus one
scalar load per key in the kernel. Error: e4m3 keeps 3 mantissa bits, so each
element is within 2^-4 relative; attention outputs land ~2-3% from fp32.

`write_kv` is an index_copy_ on every device (a copy of this step's tokens only), so its torch
version is the only one.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
_MIN_SCALE = 1e-20  # floor for an all-zero vector's scale (its codes are 0 anyway)


def new_kv_scales(k_cache: torch.Tensor) -> torch.Tensor:
    """Per-(slot, kv head) scales for an fp8 cache: [num_blocks, block_size, num_kv_heads] float32."""
    nb, bs, m, _ = k_cache.shape
    return torch.ones(nb, bs, m, dtype=torch.float32, device=k_cache.device)


def check_scale(scale: torch.Tensor | None, cache: torch.Tensor, name: str) -> None:
    """Raise ValueError unless `scale` is None or one of the forms above for `cache`."""
    if scale is None:
        return
    if cache.dtype != FP8:
        raise ValueError(f"{name} given for a {cache.dtype} cache; scales are for float8_e4m3fn caches")
    if scale.dtype != torch.float32 or scale.device != cache.device:
        raise ValueError(f"{name} must be float32 on {cache.device}, got {scale.dtype} on {scale.device}")
    if scale.numel() != 1 and (tuple(scale.shape) != tuple(cache.shape[:3]) or not scale.is_contiguous()):
        raise ValueError(f"{name} must have one element or be contiguous {tuple(cache.shape[:3])}, got {tuple(scale.shape)}")


def _store(x: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, scale: torch.Tensor | None) -> None:
    nb, bs, m, h = cache.shape
    if cache.dtype != FP8:
        cache.view(nb * bs, m, h).index_copy_(0, slots, x.to(cache.dtype))
        return
    x = x.float()  # [T, m, h]
    if scale is not None and scale.numel() == 1:
        x = x / scale.reshape(())
    elif scale is not None:
        s = (x.abs().amax(-1) / FP8_MAX).clamp_min(_MIN_SCALE)  # [T, m]
        scale.view(nb * bs, m).index_copy_(0, slots, s)
        x = x / s[..., None]
    codes = x.clamp(-FP8_MAX, FP8_MAX).to(FP8)
    # index_copy_ has no fp8 kernel on CPU: copy the bytes.
    cache.view(torch.uint8).view(nb * bs, m, h).index_copy_(0, slots, codes.view(torch.uint8))


def write_kv_ref(
    k: torch.Tensor,  # [T, m, h]
    v: torch.Tensor,  # [T, m, h]
    k_cache: torch.Tensor,  # [num_blocks, block_size, m, h]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int, slot of each token
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Store this step's keys and values at their slots (in place; fp8 caches quantized)."""
    check_scale(k_scale, k_cache, "k_scale")
    check_scale(v_scale, v_cache, "v_scale")
    slots = slot_mapping.long()
    _store(k, k_cache, slots, k_scale)
    _store(v, v_cache, slots, v_scale)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Store K/V at their slots (in place; fp8 caches quantized): `write_kv_ref` on every device."""
    write_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)
