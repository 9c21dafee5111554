"""pprt_kernels.rms_norm and pprt_kernels.rotary: the Triton kernels (under the interpreter on CPU)
equal the references on awkward shapes and strided views (rotary and the residual add bit for bit), and the references equal
transformers' own modules."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, apply_rotary_pos_emb
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNorm

from pprt_kernels.rms_norm import add_rms_norm_ref, add_rms_norm_triton, rms_norm_ref, rms_norm_triton
from pprt_kernels.rotary import apply_rotary_ref, apply_rotary_triton

# Triton's interpreter truncates fp32 -> bf16 where a GPU rounds to nearest: bf16 on a GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def _rand(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("zero_centered", [False, True])
@pytest.mark.parametrize("shape", [(2, 5), (7, 96), (3, 4, 24), (2, 3, 130)])
def test_rms_norm_triton_equals_reference(shape, zero_centered, dtype):
    gen = torch.Generator().manual_seed(hash((shape, zero_centered)) % 2**31)
    d = shape[-1]
    weight = _rand(d, dtype=dtype, gen=gen) * 0.1
    # A strided view: rows taken out of a wider buffer, as heads of a merged q/k/v output are.
    wide = _rand(*shape[:-1], d + 9, dtype=dtype, gen=gen) * 3
    x = wide[..., 2:2 + d]
    residual = _rand(*shape, dtype=dtype, gen=gen)
    assert not x.is_contiguous()
    # The mean of squares is summed in another order: one unit in the last place at most.
    y = rms_norm_triton(x, weight, 1e-6, zero_centered)
    torch.testing.assert_close(y, rms_norm_ref(x, weight, 1e-6, zero_centered))
    y, s = add_rms_norm_triton(x, residual, weight, 1e-6, zero_centered)
    y_ref, s_ref = add_rms_norm_ref(x, residual, weight, 1e-6, zero_centered)
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(y, y_ref)
    assert torch.equal(s, x + residual)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_reference_equals_transformers(dtype):
    gen = torch.Generator().manual_seed(1)
    x = _rand(6, 40, dtype=dtype, gen=gen)
    plain = Qwen2RMSNorm(40, eps=1e-6).to(dtype)
    centred = Qwen3NextRMSNorm(40, eps=1e-6).to(dtype)
    with torch.no_grad():
        plain.weight.copy_(_rand(40, dtype=dtype, gen=gen))
        centred.weight.copy_(_rand(40, dtype=dtype, gen=gen) * 0.1)
        assert torch.equal(rms_norm_ref(x, plain.weight, 1e-6), plain(x))
        assert torch.equal(rms_norm_ref(x, centred.weight, 1e-6, zero_centered=True), centred(x))


def test_rms_norm_rejects_bad_arguments():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm_triton(x, torch.randn(7), 1e-6)
    with pytest.raises(ValueError, match="residual must be"):
        add_rms_norm_triton(x, torch.randn(4, 9), torch.randn(8), 1e-6)
    with pytest.raises(ValueError, match="contiguous last axis"):
        rms_norm_triton(x.t(), torch.randn(4), 1e-6)


def _qk(t, n, m, h, dtype, gen, merged: bool):
    """q [T, n, h] and k [T, m, h]: fresh tensors, or head views of one merged q/k/v row."""
    if not merged:
        return _rand(t, n, h, dtype=dtype, gen=gen), _rand(t, m, h, dtype=dtype, gen=gen)
    qkv = _rand(t, (n + 2 * m) * h, dtype=dtype, gen=gen)
    q, k, _ = qkv.split([n * h, m * h, m * h], dim=-1)
    return q.view(t, n, h), k.view(t, m, h)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t, n, m, h, r", [(1, 1, 1, 8, 8), (5, 6, 2, 24, 24), (3, 4, 1, 32, 8), (9, 3, 3, 20, 10)])
@pytest.mark.parametrize("merged", [False, True])
def test_rotary_triton_equals_reference(t, n, m, h, r, merged, dtype):
    gen = torch.Generator().manual_seed(t * 100 + h + r)
    q, k = _qk(t, n, m, h, dtype, gen, merged)
    angles = _rand(t, r // 2, dtype=torch.float32, gen=gen) * 3
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    q_ref, k_ref = apply_rotary_ref(q, k, cos, sin)
    before = q.clone()
    q_out, k_out = apply_rotary_triton(q, k, cos, sin)
    assert q_out is q and k_out is k  # in place
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)
    assert torch.equal(q[..., r:], before[..., r:])  # dims past r pass through
    assert not torch.equal(q[..., :r], before[..., :r])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_reference_equals_transformers(dtype):
    gen = torch.Generator().manual_seed(2)
    t, n, m, h = 4, 3, 1, 16
    q, k = _rand(t, n, h, dtype=dtype, gen=gen), _rand(t, m, h, dtype=dtype, gen=gen)
    angles = _rand(t, h // 2, dtype=torch.float32, gen=gen)
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    # transformers: [batch, heads, T, h] with cos/sin [batch, T, h]
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    q, k = apply_rotary_ref(q, k, cos, sin)
    assert torch.equal(q, q_hf[0].transpose(0, 1)) and torch.equal(k, k_hf[0].transpose(0, 1))


def test_rotary_rejects_bad_arguments():
    q, k = torch.randn(3, 2, 8), torch.randn(3, 1, 8)
    with pytest.raises(ValueError, match="r even"):
        apply_rotary_triton(q, k, torch.randn(3, 7), torch.randn(3, 7))
    with pytest.raises(ValueError, match="k must be"):
        apply_rotary_triton(q, torch.randn(2, 1, 8), torch.randn(3, 8), torch.randn(3, 8))
