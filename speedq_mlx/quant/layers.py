"""Trainable fake-quantized layers on top of `format`, and their exact export.

`QuantLinear` / `QuantEmbedding` keep a float latent weight and compute with its
quantize-dequantize in MLX's affine format, so MLX autograd trains them (STE for the
weight, exact gradients for learnable scales/biases). `packed()` turns one into the
(uint32 weight, scales, biases) triple that `nn.QuantizedLinear` /
`nn.QuantizedEmbedding` compute with: the same function, bit for bit in the codes.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import format as Q

# Whether layers packed for good compute from their codes (`mx.quantized_matmul`, no dense
# copy: -1.1 GB on a 0.5B language model's embeddings and lm_head, more with a real vision
# tower) or from a dequantized fp32 copy. None = from the codes on a GPU only: on MLX's CPU
# build quantized_matmul is ~50x slower than a dense OpenBLAS matmul (benchmarks/README.md).
COMPUTE_FROM_CODES: bool | None = None


def computes_from_codes() -> bool:
    if COMPUTE_FROM_CODES is not None:
        return COMPUTE_FROM_CODES
    return mx.default_device().type == mx.DeviceType.gpu


class FakeQuant(nn.Module):
    """Shared state: latent weight, format, and optional learnable scales/biases."""

    def __init__(self, weight, bits, group_size, scale_dtype=mx.float16, learn_qparams=False,
                 scales=None, biases=None):
        super().__init__()
        Q.check_format(bits, group_size, weight.shape[-1])
        self.weight = weight
        self.bits = bits
        self.group_size = group_size
        self.scale_dtype = scale_dtype
        if scales is not None or learn_qparams:
            if scales is None:
                scales, biases = Q.rtn_params(weight, bits, group_size)
            self.scales = scales
            self.biases = biases

    @property
    def learns_qparams(self) -> bool:
        return "scales" in self

    def qparams(self) -> tuple[mx.array, mx.array]:
        """(scales, biases) rounded to the dtype they are exported in."""
        if self.learns_qparams:
            return (Q.round_to_dtype(self.scales, self.scale_dtype),
                    Q.round_to_dtype(self.biases, self.scale_dtype))
        s, b = Q.rtn_params(mx.stop_gradient(self.weight), self.bits, self.group_size,
                               self.scale_dtype)
        return mx.stop_gradient(s), mx.stop_gradient(b)

    @property
    def packed_for_good(self) -> bool:
        return "_packed" in self.__dict__

    def pack_for_good(self) -> None:
        """For a layer that will not train again: keep its packed codes (what export writes)
        and the weight they dequantize to (what it computes with), and drop the float latent.
        On a 0.5B language model that frees the fp32 latents of embeddings and lm_head (1.1 GB)."""
        if self.packed_for_good:
            return
        self.freeze()
        from_codes = computes_from_codes()
        dequantized = None if from_codes else self.dequantized_weight()  # the frozen cache if made
        packed = self.packed()
        mx.eval(packed)
        object.__setattr__(self, "_packed", packed)
        object.__setattr__(self, "_dq_cache", None)
        self.weight = packed["weight"] if from_codes else dequantized
        self.freeze()

    @property
    def weight_shape(self) -> tuple[int, int]:
        """(rows, columns) of the float weight, also once only its codes are kept."""
        if self.packed_for_good:
            codes = self._packed["weight"]
            return codes.shape[0], codes.shape[1] * 32 // self.bits
        return tuple(self.weight.shape)

    def _check_frozen(self) -> None:
        if self.trainable_parameters():
            raise RuntimeError("a layer packed for good cannot train again (its latent weight is gone)")

    def _codes_args(self, dtype) -> tuple:
        """(codes, scales, biases) in `dtype`: what mx.quantized_matmul / mx.dequantize take."""
        p = self._packed
        return p["weight"], p["scales"].astype(dtype), p["biases"].astype(dtype)

    def _from_codes(self) -> bool:
        return self.packed_for_good and self.weight.dtype == mx.uint32

    def matmul_t(self, x: mx.array) -> mx.array:
        """x @ W.T with W the layer's (fake-)quantized weight."""
        if self._from_codes():
            self._check_frozen()
            w, s, b = self._codes_args(x.dtype)
            return mx.quantized_matmul(x, w, s, b, transpose=True, group_size=self.group_size,
                                       bits=self.bits)
        return x @ self.dequantized_weight().astype(x.dtype).T

    def dequantized_weight(self) -> mx.array:
        if self.packed_for_good:
            self._check_frozen()
            if self._from_codes():  # on demand: a transient dense copy
                w, s, b = self._codes_args(mx.float32)
                return mx.dequantize(w, s, b, group_size=self.group_size, bits=self.bits)
            return self.weight
        if self.trainable_parameters():
            s, b = self.qparams()
            return Q.fake_quantize(self.weight, s, b, self.bits, self.group_size)
        # Frozen (embeddings, lm_head, a finished stage): quantize once, not every step.
        # The cache holds the arrays it was made from; any replaced array invalidates it.
        # (Gradient code must not pass the model as an argument to mx.value_and_grad: it
        # swaps the arrays inside for tracer copies, a miss here on every step.)
        key = (self.weight, self.get("scales"), self.get("biases"))
        cached = getattr(self, "_dq_cache", None)
        if cached is None or any(a is not b for a, b in zip(cached[0], key)):
            object.__setattr__(self, "_dq_cache", (key, self._quantize_frozen()))
            cached = self._dq_cache
        return cached[1]

    def _quantize_frozen(self) -> mx.array:
        s, b = self.qparams()
        w = mx.stop_gradient(Q.fake_quantize(self.weight, s, b, self.bits, self.group_size))
        mx.eval(w)
        return w

    def packed(self) -> dict:
        """{'weight': uint32 codes, 'scales', 'biases'} in the export dtype."""
        if self.packed_for_good:
            return dict(self._packed)
        w = mx.stop_gradient(self.weight)
        s, b = (mx.stop_gradient(x) for x in self.qparams())
        q = Q.codes(w, s, b, self.bits, self.group_size)
        dtype = self.scale_dtype or w.dtype
        return {"weight": Q.pack(q, self.bits), "scales": s.astype(dtype),
                "biases": b.astype(dtype)}


class QuantLinear(FakeQuant):
    """y = x @ fake_quant(W).T + bias."""

    def __init__(self, weight, bias=None, **kw):
        super().__init__(weight, **kw)
        if bias is not None:
            self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int, **kw) -> "QuantLinear":
        return cls(linear.weight, linear.get("bias"), bits=bits, group_size=group_size, **kw)

    def __call__(self, x):
        y = self.matmul_t(x)
        if "bias" in self:
            y = y + self.bias
        return y

    def packed(self) -> dict:
        out = super().packed()
        if "bias" in self:
            out["bias"] = self.bias
        return out

    def to_quantized(self) -> nn.QuantizedLinear:
        """The `nn.QuantizedLinear` that computes the same function."""
        out_dims, in_dims = self.weight_shape
        layer = nn.QuantizedLinear(in_dims, out_dims, bias="bias" in self,
                                   group_size=self.group_size, bits=self.bits)
        layer.update(self.packed())
        return layer


class QuantEmbedding(FakeQuant):
    """Embedding lookup in fake_quant(W); `as_linear` serves a tied lm_head."""

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int, group_size: int, **kw):
        return cls(emb.weight, bits=bits, group_size=group_size, **kw)

    def __call__(self, ids):
        if self._from_codes():  # dequantize the looked-up rows only
            self._check_frozen()
            w, s, b = self._codes_args(mx.float32)
            return mx.dequantize(w[ids], s[ids], b[ids], group_size=self.group_size, bits=self.bits)
        return self.dequantized_weight()[ids]

    def as_linear(self, x):
        return self.matmul_t(x)

    def to_quantized(self) -> nn.QuantizedEmbedding:
        num, dims = self.weight_shape
        layer = nn.QuantizedEmbedding(num, dims, group_size=self.group_size, bits=self.bits)
        layer.update(self.packed())
        return layer


def pack_frozen(model: nn.Module) -> int:
    """pack_for_good() every fake-quantized layer of `model` that is frozen now (the stages
    call it once they have unfrozen what they train); returns how many it packed."""
    frozen = [m for m in model.modules() if isinstance(m, FakeQuant) and not m.packed_for_good
              and not m.trainable_parameters()]
    for m in frozen:
        m.pack_for_good()
    return len(frozen)


def fake_quant_module(module: nn.Module, bits: int, group_size: int, latent_dtype=None,
                      **kw) -> FakeQuant:
    """The fake-quantized twin of an nn.Linear or nn.Embedding (its latent weight cast to
    `latent_dtype` when given)."""
    weight = module.weight if latent_dtype is None else module.weight.astype(latent_dtype)
    if isinstance(module, nn.Linear):
        return QuantLinear(weight, module.get("bias"), bits=bits, group_size=group_size, **kw)
    if isinstance(module, nn.Embedding):
        return QuantEmbedding(weight, bits=bits, group_size=group_size, **kw)
    raise TypeError(f"cannot quantize a {type(module).__name__}")
