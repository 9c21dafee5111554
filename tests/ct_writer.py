"""Test-side writer of compressed-tensors checkpoints with that library's own compressors.

`ct_compress(weight, args)` computes min/max quantization parameters per the scheme's
strategy with the library's `calculate_qparams`, then runs the library's compressor
for the format (`PackedQuantizationCompressor` for int4 `pack-quantized`,
`FloatQuantizationCompressor` for fp8 `float-quantized`) on the weight, and its
`decompress` on the result: the stored tensors and the dequantized weight [N, K],
which is the oracle of the end-to-end checks. `ct_config(groups, ignore)` is the
`quantization_config` the library's ModelCompressor writes into config.json.
Needs the `compressed-tensors` package (test extra).
"""

from __future__ import annotations

import compressed_tensors
import torch
from compressed_tensors.compressors.base import BaseCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from compressed_tensors.quantization.utils.helpers import calculate_qparams


def _min_max(w: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    strategy = str(args.strategy.value if hasattr(args.strategy, "value") else args.strategy)
    if strategy == "group":
        g = w.reshape(n, k // args.group_size, args.group_size)
        return g.amin(-1), g.amax(-1)  # [N, K/g]
    if strategy == "channel":
        return w.amin(1, keepdim=True), w.amax(1, keepdim=True)  # [N, 1]
    if strategy == "tensor":
        return w.amin().reshape(1), w.amax().reshape(1)
    bn, bk = args.block_structure
    nb, kb = -(-n // bn), -(-k // bk)
    padded = torch.nn.functional.pad(w, (0, kb * bk - k, 0, nb * bn - n))  # zeros: inside every range
    blocks = padded.reshape(nb, bn, kb, bk)
    return blocks.amin((1, 3)), blocks.amax((1, 3))  # [N/bn, K/bk]


def ct_compress(weight: torch.Tensor, args: QuantizationArgs, fmt: str) -> tuple[dict, torch.Tensor]:
    """(stored tensors by the library's compressor, the library's dequantized weight [N, K])."""
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    w = weight.float()
    scale, zero = calculate_qparams(*_min_max(w, args), args)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    state = {"weight": w, "weight_scale": scale}
    if not args.symmetric:
        state["weight_zero_point"] = zero
    stored = compressor.compress(state, scheme)
    deq = compressor.decompress(dict(stored), scheme)["weight"]
    return stored, deq.float()


def ct_config(groups: dict[str, tuple[list[str], QuantizationArgs, str]], ignore: list[str],
              input_activations: QuantizationArgs | None = None) -> dict:
    """quantization_config as ModelCompressor.update_config writes it."""
    schemes = {name: QuantizationScheme(targets=targets, weights=args, input_activations=input_activations,
                                        format=fmt)
               for name, (targets, args, fmt) in groups.items()}
    formats = {fmt for _, _, fmt in groups.values()}
    qc = QuantizationConfig(config_groups=schemes, ignore=ignore,
                            format=formats.pop() if len(formats) == 1 else "mixed-precision",
                            quantization_status="compressed")
    return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors", "sparsity_config": {},
            "transform_config": {}, **qc.model_dump(exclude=["quant_method"], mode="json")}
