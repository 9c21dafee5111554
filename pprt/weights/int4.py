"""pprt's one Int4 weight format; import of GPTQ / AWQ checkpoints; quantize-at-load.

The format (`Int4Weight`), for a linear layer y = x @ W^T with W [N, K]
(N = out_features, K = in_features) and group size g (K % g == 0):

    qweight int32 [K/8, N]   packed along K: nibble j (bits 4j..4j+3) of word
                             [r, n] holds q[8r + j, n], a value in 0..15
                             (GPTQ's order: a row of words is contiguous in N,
                             so the kernels' loads coalesce along N)
    scales  [K/g, N]         in the activation dtype (fp16 / bf16 / fp32)
    zeros   uint8 [K/g, N]   zero points 0..15 (symmetric quantization: 8)
    perm    int64 [K] | None GPTQ desc_act: rows are stored sorted by group so
                             groups are contiguous; the activation is gathered
                             x[:, perm] before the matmul

    W[n, perm[k]] = scales[k // g, n] * (q[k, n] - zeros[k // g, n])   (perm = identity when None)

Bytes per layer: K*N/2 + (K/g)*N*(2 + 1) for fp16/bf16 scales.

Checkpoint formats (shared/QWEN.md section 4) convert into this one at load:
GPTQ v1 (zeros stored minus one) and v2, sym or asym, desc_act with any
g_idx whose groups hold g rows each; AWQ gemm (packed along N in the
interleaved nibble order [0, 2, 4, 6, 1, 3, 5, 7], no zero offset).
`Int4Linear` is the module the model uses; its forward goes through
pprt_kernels.int4_matmul (Triton on CUDA, torch on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

import pprt_kernels.int4_matmul as int4_kernels  # by attribute: a test may reload it under TRITON_INTERPRET

if TYPE_CHECKING:
    from ..quantization import ModuleFormat, QuantConfig

RTN_GROUP_SIZE = 128  # quantize-at-load's preferred group (pprt.quantization.rtn_group_size picks per layer)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column 8c + AWQ_ORDER[i]
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(slots=True)
class Int4Weight:
    qweight: torch.Tensor  # int32 [K/8, N]
    scales: torch.Tensor  # [K/g, N] float
    zeros: torch.Tensor  # uint8 [K/g, N]
    group_size: int
    perm: torch.Tensor | None = None  # int64 [K]: x[:, perm] before the matmul

    def __post_init__(self) -> None:
        q, s, z = self.qweight, self.scales, self.zeros
        if q.dtype != torch.int32 or q.dim() != 2:
            raise ValueError(f"Int4Weight.qweight must be a 2-D int32 [K/8, N] tensor, got {q.dtype} {tuple(q.shape)}")
        k, n = q.shape[0] * 8, q.shape[1]
        g = self.group_size
        if g <= 0 or g % 8 or k % g:
            raise ValueError(f"Int4Weight.group_size {g} must be a positive multiple of 8 dividing K = {k}")
        if s.dtype not in _FLOAT_DTYPES or tuple(s.shape) != (k // g, n):
            raise ValueError(f"Int4Weight.scales must be float [{k // g}, {n}], got {s.dtype} {tuple(s.shape)}")
        if z.dtype != torch.uint8 or tuple(z.shape) != (k // g, n):
            raise ValueError(f"Int4Weight.zeros must be uint8 [{k // g}, {n}], got {z.dtype} {tuple(z.shape)}")
        if self.perm is not None:
            if self.perm.dtype not in (torch.int32, torch.int64) or tuple(self.perm.shape) != (k,):
                raise ValueError(
                    f"Int4Weight.perm must be int32/int64 [{k}], got {self.perm.dtype} {tuple(self.perm.shape)}"
                )
            self.perm = self.perm.long()
        devices = {t.device for t in (q, s, z) + ((self.perm,) if self.perm is not None else ())}
        if len(devices) != 1:
            raise ValueError(f"Int4Weight tensors are on different devices: {sorted(map(str, devices))}")

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * 8

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def nbytes(self) -> int:
        ts = (self.qweight, self.scales, self.zeros) + ((self.perm,) if self.perm is not None else ())
        return sum(t.numel() * t.element_size() for t in ts)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Int4Weight:
        """Moved to `device`; scales cast to `dtype` (the activation dtype)."""
        perm = self.perm.to(device) if self.perm is not None else None
        return Int4Weight(self.qweight.to(device), self.scales.to(device, dtype or self.scales.dtype),
                          self.zeros.to(device), self.group_size, perm)


# ---------------------------------------------------------------- packing


def pack(q: torch.Tensor, dim: int = 0, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Pack 4-bit values (0..15) eight to an int32 along `dim`, least-significant nibble first.

    Nibble i of word c holds element 8c + order[i] (order = identity unless given, e.g. AWQ_ORDER).
    Works nibble by nibble in int32, so a GPU-sized layer needs no int64 temporaries.
    """
    if q.shape[dim] % 8:
        raise ValueError(f"pack: size {q.shape[dim]} of dim {dim} is not a multiple of 8")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("pack: values must lie in 0..15")
    q = q.movedim(dim, -1)  # [..., L]
    words = torch.zeros(*q.shape[:-1], q.shape[-1] // 8, dtype=torch.int32, device=q.device)
    for i in range(8):
        nib = q[..., (order[i] if order else i)::8].to(torch.int32)  # [..., L/8]
        if i == 7:  # the top nibble carries the sign bit: add it as a signed value, no overflow
            nib = nib - 16 * (nib >= 8).to(torch.int32)
        words += nib * (1 << (4 * i))  # disjoint bits: + is |
    return words.movedim(-1, dim).contiguous()


def unpack(packed: torch.Tensor, dim: int = 0, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of `pack`: uint8 values 0..15 with `dim` eight times longer."""
    if packed.dtype != torch.int32:
        raise ValueError(f"unpack: expected int32 words, got {packed.dtype}")
    w = packed.movedim(dim, -1)  # [..., W]
    q = torch.empty(*w.shape[:-1], w.shape[-1] * 8, dtype=torch.uint8, device=w.device)
    for i in range(8):
        q[..., (order[i] if order else i)::8] = ((w >> (4 * i)) & 0xF).to(torch.uint8)
    return q.movedim(-1, dim).contiguous()


# ---------------------------------------------------------------- float <-> Int4


def quantize_rtn(weight: torch.Tensor, group_size: int = 128, sym: bool = False) -> Int4Weight:
    """Round-to-nearest per group of `group_size` input columns, on the weight's device.

    weight [N, K] float. Asymmetric: scale = (max - min) / 15 and zero = round(-min / scale);
    symmetric: scale = 2 max|w| / 15 and zero = 8 (GPTQ's convention). Scales keep the
    weight's dtype and q is computed against the rounded scale, so |W - dequantize| <= scale / 2
    except where clamping at 0 or 15 adds at most a rounding of the scale.
    Works in row chunks so that the temporaries stay near the size of the weight.
    """
    if weight.dim() != 2 or weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"quantize_rtn: weight must be a 2-D float [N, K] tensor, got {weight.dtype} {tuple(weight.shape)}"
        )
    n, k = weight.shape
    if group_size <= 0 or group_size % 8 or k % group_size:
        raise ValueError(f"quantize_rtn: group_size {group_size} must be a positive multiple of 8 dividing K = {k}")
    packed, ss, zs = [], [], []
    rows = max(1, (1 << 24) // k)  # ~64 MiB of fp32 per chunk
    for r0 in range(0, n, rows):
        w = weight[r0:r0 + rows].float().reshape(-1, k // group_size, group_size)  # [n', K/g, g]
        if sym:
            scale = w.abs().amax(-1) * (2 / 15)
        else:  # the range includes 0, so zero is exact and a constant group is representable
            lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
            scale = (hi - lo) / 15
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(weight.dtype).float()  # [n', K/g]
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # underflow in fp16/bf16
        zero = torch.full_like(scale, 8.0) if sym else (-lo / scale).round().clamp(0, 15)
        q = (w / scale[..., None]).round().add(zero[..., None]).clamp(0, 15)  # [n', K/g, g]
        packed.append(pack(q.to(torch.uint8).view(-1, k), dim=1).t())  # [K/8, n']
        ss.append(scale.to(weight.dtype))
        zs.append(zero.to(torch.uint8))
    return Int4Weight(torch.cat(packed, dim=1).contiguous(), torch.cat(ss).t().contiguous(),
                      torch.cat(zs).t().contiguous(), group_size)


def dequantize(w: Int4Weight) -> torch.Tensor:
    """The float weight W [N, K] (original column order, scales' dtype)."""
    w_t = int4_kernels.int4_dequantize_ref(w.qweight, w.scales, w.zeros, w.group_size)  # [K, N], stored row order
    if w.perm is not None:
        w_t = torch.empty_like(w_t).index_copy_(0, w.perm, w_t)  # row perm[k] of W^T is stored row k
    return w_t.t().contiguous()


def from_gptq(
    qweight: torch.Tensor,  # int32 [K/8, N]
    qzeros: torch.Tensor,  # int32 [K/g, N/8]
    scales: torch.Tensor,  # [K/g, N]
    g_idx: torch.Tensor | None,  # int [K]; None means k // g
    qconfig: QuantConfig | ModuleFormat,  # group_size, checkpoint_format
    dtype: torch.dtype | None = None,  # scales' dtype (the activation dtype); None keeps the stored one
) -> Int4Weight:
    """GPTQ tensors as stored by AutoGPTQ / GPTQModel (v1 or v2 zeros) to Int4Weight."""
    g = qconfig.group_size
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"gptq: qweight and qzeros must be int32, got {qweight.dtype} and {qzeros.dtype}")
    zeros = unpack(qzeros, dim=1)  # [K/g, N]
    if qconfig.checkpoint_format == "gptq":  # v1 stores zero - 1
        zeros = (zeros + 1) & 0xF
    qweight, perm = regroup_rows(qweight, g_idx, g)
    return Int4Weight(qweight.contiguous(), scales.to(dtype or scales.dtype).contiguous(), zeros, g, perm)


def regroup_rows(qweight: torch.Tensor, g_idx: torch.Tensor | None, g: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of qweight [K/8, N] sorted by group when g_idx [K] (activation order) is not k // g.

    Returns (qweight, perm): row k of the result is row perm[k] of the layer; perm is None when
    g_idx is absent or trivial. Raises ValueError unless every group holds exactly g rows.
    """
    k = qweight.shape[0] * 8
    if g_idx is None:
        return qweight, None
    g_idx = g_idx.to(qweight.device).long()
    if tuple(g_idx.shape) != (k,):
        raise ValueError(f"g_idx has shape {tuple(g_idx.shape)}, expected [{k}]")
    if torch.equal(g_idx, torch.arange(k, device=g_idx.device) // g):
        return qweight, None
    perm = torch.argsort(g_idx, stable=True)  # [K], rows grouped
    counts = torch.bincount(g_idx.clamp(min=0), minlength=k // g)
    if int(g_idx.min()) < 0 or counts.numel() != k // g or bool((counts != g).any()):
        raise ValueError(f"g_idx does not put exactly group_size={g} rows in each of {k // g} groups")
    return pack(unpack(qweight, dim=0)[perm], dim=0), perm  # [K/8, N] in group order


def from_awq(
    qweight: torch.Tensor,  # int32 [K, N/8], packed along N in AWQ_ORDER
    qzeros: torch.Tensor,  # int32 [K/g, N/8], same packing
    scales: torch.Tensor,  # [K/g, N]
    group_size: int,
    dtype: torch.dtype | None = None,
) -> Int4Weight:
    """AWQ gemm tensors (AutoAWQ) to Int4Weight: repack along K in plain nibble order."""
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"awq: qweight and qzeros must be int32, got {qweight.dtype} and {qzeros.dtype}")
    q = unpack(qweight, dim=1, order=AWQ_ORDER)  # [K, N]
    zeros = unpack(qzeros, dim=1, order=AWQ_ORDER)  # [K/g, N]
    return Int4Weight(pack(q, dim=0), scales.to(dtype or scales.dtype).contiguous(), zeros, group_size)


# ---------------------------------------------------------------- the module


class Int4Linear(torch.nn.Module):
    """y = x @ W^T + b with W held as an Int4Weight (buffers, so .to() moves it)."""

    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.group_size = weight.group_size
        if bias is not None and (tuple(bias.shape) != (self.out_features,) or bias.dtype != weight.scales.dtype):
            raise ValueError(
                f"Int4Linear: bias must be {weight.scales.dtype} [{self.out_features}], "
                f"got {bias.dtype} {tuple(bias.shape)}"
            )
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("zeros", weight.zeros)
        self.register_buffer("perm", weight.perm)
        self.register_buffer("bias", bias)
        self._cpu_pack: int4_kernels.CpuInt4Pack | None = None  # torch's CPU int4 layout, built on first CPU use
        self._cpu_pack_key: tuple | None = None

    @property
    def weight(self) -> Int4Weight:
        return Int4Weight(self.qweight, self.scales, self.zeros, self.group_size, self.perm)

    def _cpu_layout(self) -> int4_kernels.CpuInt4Pack | None:
        key = (self.qweight.device, self.scales.dtype, self.qweight.data_ptr())
        if self._cpu_pack_key != key:  # converted once per placement, not per call
            self._cpu_pack = int4_kernels.pack_for_cpu(self.qweight, self.scales, self.zeros, self.group_size)
            self._cpu_pack_key = key
        return self._cpu_pack

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        cpu_pack = self._cpu_layout() if self.qweight.device.type == "cpu" else None
        y = int4_kernels.int4_matmul(
            x2, self.qweight, self.scales, self.zeros, self.group_size, self.bias, cpu_pack=cpu_pack
        )
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, " \
               f"bias={self.bias is not None}, desc_act={self.perm is not None}"


# ---------------------------------------------------------------- loader hooks


def _expect(t: torch.Tensor, name: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise ValueError(f"tensor {name} has shape {list(t.shape)}, expected {list(shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"tensor {name} has dtype {t.dtype}, expected one of {[str(d) for d in dtypes]}")
    return t


def load_quantized_linear(
    read: Callable[[str], torch.Tensor],
    prefix: str,
    in_features: int,
    out_features: int,
    has_bias: bool,
    qconfig: QuantConfig | ModuleFormat,
    dtype: torch.dtype,
    device: torch.device,
) -> Int4Linear:
    """Read one GPTQ / AWQ linear layer `prefix` and convert it on `device`.

    `qconfig`: the checkpoint's config, or this module's format (GPTQ `dynamic` rules may give
    a module its own group_size, sym, desc_act).
    `read(name)` returns a stored tensor on `device` in its stored dtype, or raises naming it.
    Shapes follow in/out features as the config gives them (padded sizes included).
    GPTQ's g_idx is read only with desc_act (otherwise groups are k // g, as GPTQ kernels assume).
    """
    k, n, g = in_features, out_features, qconfig.group_size
    if k % g:
        raise ValueError(f"{prefix}: in_features {k} is not a multiple of group_size {g}")
    if k % 8 or n % 8:
        raise ValueError(f"{prefix}: in_features {k} and out_features {n} must be multiples of 8 for int4 packing")
    if qconfig.method not in ("gptq", "awq"):
        raise ValueError(f"{prefix}: quantization method {qconfig.method!r} is not supported (gptq, awq)")
    floats = _FLOAT_DTYPES
    packed_shape = (k // 8, n) if qconfig.method == "gptq" else (k, n // 8)
    qweight = _expect(read(f"{prefix}.qweight"), f"{prefix}.qweight", packed_shape, (torch.int32,))
    qzeros = _expect(read(f"{prefix}.qzeros"), f"{prefix}.qzeros", (k // g, n // 8), (torch.int32,))
    scales = _expect(read(f"{prefix}.scales"), f"{prefix}.scales", (k // g, n), floats)
    if qconfig.method == "gptq":
        g_idx = None
        if qconfig.desc_act:
            g_idx = _expect(read(f"{prefix}.g_idx"), f"{prefix}.g_idx", (k,), (torch.int32, torch.int64))
        try:
            w = from_gptq(qweight, qzeros, scales, g_idx, qconfig, dtype=dtype)
        except ValueError as e:
            raise ValueError(f"{prefix}: {e}") from None
    else:
        w = from_awq(qweight, qzeros, scales, g, dtype=dtype)
    bias = None
    if has_bias:
        bias = _expect(read(f"{prefix}.bias"), f"{prefix}.bias", (n,), floats).to(dtype)
    return Int4Linear(w.to(device), bias.to(device) if bias is not None else None)


def quantize_linear(weight: torch.Tensor, bias: torch.Tensor | None, group_size: int = RTN_GROUP_SIZE) -> Int4Linear:
    """Quantize-at-load (RTN, asymmetric) of one float layer, on the weight's device and in its dtype."""
    return Int4Linear(quantize_rtn(weight, group_size), bias.to(weight.dtype) if bias is not None else None)
