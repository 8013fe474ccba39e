"""Score with oneDNN's fp32 matrix product for a model's large Linear layers on CPU.

PyTorch's CPU `nn.Linear` calls MKL's sgemm. On the AMD EPYC (Zen 5, AVX-512) machines this project
runs on, MKL takes its AVX2 path and reaches about half of the cores' fp32 peak; oneDNN, which ships
inside PyTorch, dispatches on the instruction set and runs the same product about 1.9× faster
(`docs/benchmarks.md`). Both are plain fp32 products: the results differ by summation order only
(tests compare with the model's own forward).

Inside the context, every `torch.nn.Linear` of the model (the class itself, not subclasses with a
forward of their own) sends an fp32 CPU input with at least `MIN_MACS` multiply-adds to oneDNN when
autograd is off (scoring), or, when the caller asks for input gradients only, with autograd on (Fisher
estimation: the forward and the backward to the layer's input both on oneDNN, no weight gradient).
Anything else (another dtype or device, a small product where oneDNN's call costs more, a training
step) goes to the layer's own forward.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fishmerge.forward.patches import ModelPatch

# Below about 4 M multiply-adds a product (e.g. 32 rows × 384 × 384) oneDNN's call overhead outweighs its
# faster kernel on the 2-core EPYC: measured 0.3–0.9× for heads and tiny batches, 1.2× at 4.7 M, 1.9× at 250 M.
MIN_MACS = 1 << 22


def available() -> bool:
    """Whether this PyTorch build has oneDNN's linear op for dense CPU tensors."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether oneDNN can run this product and gains by it: fp32 dense CPU tensors, a large enough product."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.layout == torch.strided
        and weight.layout == torch.strided
        and weight.device.type == "cpu"
        and (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu"))
        and x.dim() >= 2
        and x.numel() * weight.shape[0] >= MIN_MACS
    )


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x Wᵀ + b on oneDNN (no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _InputGradProduct(torch.autograd.Function):
    """x Wᵀ + b on oneDNN whose backward gives x's gradient only (g W, on oneDNN when large enough); the
    weight and bias get none."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _product(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    @once_differentiable  # the product has no autograd formula of its own: no second derivatives through it
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        wt = weight.t()  # (in, out): g W = g (Wᵀ)ᵀ, a product oneDNN takes with a strided weight
        gx = _product(grad, wt, None) if _fits(grad, wt, None) else grad.matmul(weight)
        return gx, None, None


# .input_grads_only: this thread's patched products give their inputs' gradients only (every patched model
# run in this thread inside the context, not only the one it was entered for)
_local = threading.local()


def _forward(self: torch.nn.Linear, input: torch.Tensor) -> torch.Tensor:  # nn.Linear's own parameter name
    weight, bias = self.weight, self.bias
    if _fits(input, weight, bias):
        if not torch.is_grad_enabled():
            return _product(input, weight, bias)
        if getattr(_local, "input_grads_only", False) and input.requires_grad:
            return _InputGradProduct.apply(input, weight.detach(), None if bias is None else bias.detach())
    return F.linear(input, weight, bias)


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


@contextmanager
def onednn_linears(model: torch.nn.Module, input_grads_only: bool = False) -> Iterator[bool]:
    """While inside, the model's large fp32 CPU Linear products run on oneDNN (yields True), or the model
    is left as it is (False); put back when the last caller using this model leaves.

    With autograd on, a product goes to oneDNN only with `input_grads_only`: then, in this thread, autograd
    reaches each such layer's input but not its weight and bias (`.grad` and `autograd.grad` of them see
    nothing). For Fisher estimation, which takes gradients w.r.t. layer outputs and forms the weights'
    per-example gradients itself. An input that needs no gradient keeps the layer's own forward."""
    before = getattr(_local, "input_grads_only", False)
    with _ONEDNN.active(model) as on:
        _local.input_grads_only = input_grads_only
        try:
            yield on
        finally:
            _local.input_grads_only = before
