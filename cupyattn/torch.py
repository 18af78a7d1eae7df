"""PyTorch autograd for cupyattn: `cupyattn.torch.attention(q, k, v, **kw)` on torch tensors.

Tensors cross to CuPy (CUDA tensors) or NumPy (CPU tensors) through DLPack, without copies, and
the kernels run on PyTorch's current CUDA stream. Forward saves only q, k, v, out and lse;
backward recomputes the probabilities from them. PyTorch is an optional dependency (extra
`torch`); this module imports it, the rest of the package never does.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from . import _api


def _to_array(tensor):
    if tensor is None:
        return None
    tensor = tensor.detach()
    if tensor.is_cuda:
        import cupy
        return cupy.from_dlpack(tensor)
    if tensor.dtype == torch.bfloat16:
        raise TypeError("bfloat16 CPU tensors cannot be shared with NumPy through DLPack; use a CUDA tensor")
    return np.from_dlpack(tensor)


def _to_tensor(array):
    return torch.from_dlpack(array)


def _on_torch_stream(tensor):
    """CuPy work inside this block runs on PyTorch's current stream for the tensor's device."""
    if not tensor.is_cuda:
        return contextlib.nullcontext()
    import cupy
    stream = torch.cuda.current_stream(tensor.device)
    if hasattr(stream, "__cuda_stream__") and hasattr(cupy.cuda.Stream, "from_external"):
        wrapped = cupy.cuda.Stream.from_external(stream)       # the CUDA stream protocol (CuPy >= 14)
    else:
        wrapped = cupy.cuda.ExternalStream(stream.cuda_stream, tensor.device.index)
    return _Both(cupy.cuda.Device(tensor.device.index), wrapped)


class _Both:
    def __init__(self, *managers):
        self.managers = managers

    def __enter__(self):
        for m in self.managers:
            m.__enter__()

    def __exit__(self, *exc):
        for m in reversed(self.managers):
            m.__exit__(*exc)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale, backend):
        with _on_torch_stream(q):
            out, lse = _api.attention(_to_array(q), _to_array(k), _to_array(v), causal=causal, scale=scale,
                                      mask=_to_array(mask), backend=backend, return_lse=True)
        out, lse = _to_tensor(out), _to_tensor(lse)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.options = dict(causal=causal, scale=scale, backend=backend)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, mask = ctx.saved_tensors
        with _on_torch_stream(q):
            grads = _api.attention_backward(_to_array(dout.contiguous()), _to_array(q), _to_array(k), _to_array(v),
                                            _to_array(out), _to_array(lse), mask=_to_array(mask), **ctx.options)
        dq, dk, dv = (_to_tensor(g) for g in grads)
        return dq, dk, dv, None, None, None, None


def attention(q, k, v, *, causal=False, scale=None, mask=None, backend="auto", return_lse=False):
    """cupyattn.attention for torch tensors, differentiable in q, k and v (not in mask).

    Same arguments and conventions as `cupyattn.attention` (causal is bottom-right aligned).
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("mask", mask)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__qualname__}")
    if mask is not None and mask.requires_grad:
        raise ValueError("no gradient flows to mask; pass mask.detach()")
    out, lse = _Attention.apply(q, k, v, mask, causal, scale, backend)
    return (out, lse) if return_lse else out
