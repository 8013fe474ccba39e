"""Score with oneDNN's fp32 matrix product for a model's large Linear layers on CPU.

PyTorch's CPU `nn.Linear` calls MKL's sgemm. On the AMD EPYC (Zen 5, AVX-512) machines this project
runs on, MKL takes its AVX2 path and reaches about half of the cores' fp32 peak; oneDNN, which ships
inside PyTorch, dispatches on the instruction set and runs the same product about 1.9× faster
(`docs/benchmarks.md`). Both are plain fp32 products: the results differ by summation order only
(tests compare with the model's own forward).

Used where the model only scores (no autograd): inside the context, every `torch.nn.Linear` of the
model (the class itself, not subclasses with a forward of their own) sends an fp32 CPU input with at
least `MIN_MACS` multiply-adds to oneDNN; anything else (autograd on, another dtype or device, a small
product where oneDNN's call costs more) goes to the layer's own forward.
"""

from __future__ import annotations

import types
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F

from fishmerge.forward.patches import ModelPatch

# Below about 4 M multiply-adds a product (e.g. 32 rows × 384 × 384) oneDNN's call overhead outweighs its
# faster kernel on the 2-core EPYC: measured 0.3–0.9× for heads and tiny batches, 1.2× at 4.7 M, 1.9× at 250 M.
MIN_MACS = 1 << 22


def available() -> bool:
    """Whether this PyTorch build has oneDNN's linear op for dense CPU tensors."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether oneDNN runs this product: fp32 dense CPU tensors, no autograd, a large enough product."""
    return (
        not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.layout == torch.strided
        and weight.layout == torch.strided
        and weight.device.type == "cpu"
        and (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu"))
        and x.dim() >= 2
        and x.numel() * weight.shape[0] >= MIN_MACS
    )


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if _takes(x, self.weight, self.bias):
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
    return F.linear(x, self.weight, self.bias)


def _linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The model's plain Linear layers whose forward nobody else has replaced (accelerate's hooks do)."""
    return [m for m in model.modules() if type(m) is torch.nn.Linear and _ours_or_none(m.__dict__.get("forward"))]


def _ours_or_none(forward) -> bool:
    return forward is None or getattr(forward, "__func__", None) is _forward


def applies(model: torch.nn.Module) -> bool:
    """Whether the model has plain Linear layers on CPU and this PyTorch has oneDNN's op."""
    return available() and any(m.weight.device.type == "cpu" for m in _linears(model))


def _swap(model: torch.nn.Module) -> None:
    for m in _linears(model):
        m.forward = types.MethodType(_forward, m)


def _restore(model: torch.nn.Module) -> None:
    for m in _linears(model):
        if "forward" in m.__dict__:
            del m.forward


_ONEDNN = ModelPatch(applies, _swap, _restore)


def onednn_linears(model: torch.nn.Module) -> AbstractContextManager[bool]:
    """While inside (and autograd off), the model's large fp32 CPU Linear products run on oneDNN (yields
    True), or the model is left as it is (False). Put back when the last caller using this model leaves."""
    return _ONEDNN.active(model)
