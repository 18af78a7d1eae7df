"""Input validation: the user's arguments become one normalized `Problem`.

Every backend receives a `Problem` and never looks at raw arguments, so the rules about shapes,
dtypes, broadcasting and array libraries live here and only here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np
import ml_dtypes

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT16 = np.dtype(np.float16)
FLOAT32 = np.dtype(np.float32)
FLOAT64 = np.dtype(np.float64)
SUPPORTED_DTYPES = (FLOAT16, BFLOAT16, FLOAT32, FLOAT64)
HALF_DTYPES = (FLOAT16, BFLOAT16)


def _cupy_or_none():
    try:
        import cupy
    except ImportError:  # the NumPy path works without CuPy
        return None
    return cupy


def library_of(name: str, array) -> str:
    """'numpy' or 'cupy' for an accepted array; TypeError for anything else."""
    if isinstance(array, np.ndarray):
        return "numpy"
    cupy = _cupy_or_none()
    if cupy is not None and isinstance(array, cupy.ndarray):
        return "cupy"
    raise TypeError(
        f"{name} must be a numpy.ndarray or cupy.ndarray, got {type(array).__module__}."
        f"{type(array).__qualname__}")


def dtype_name(dtype) -> str:
    return "bfloat16" if np.dtype(dtype) == BFLOAT16 else np.dtype(dtype).name


@dataclass(frozen=True)
class Problem:
    """One attention problem, validated.

    q, k, v (and mask) are views broadcast to the common batch shape, each shaped
    `batch_shape + (heads, length, dim)`; nothing is copied. Inputs given without a head axis
    (rank 2) get a head axis of 1 here, removed again from the outputs.
    """
    xp: Any                          # numpy or cupy
    q: Any
    k: Any
    v: Any
    mask: Any                        # None, or a view broadcast to batch_shape + (Hq, Lq, Lk)
    mask_kind: Optional[str]         # None, "bool" (True = may attend) or "bias" (added to scores)
    causal: bool                     # bottom-right aligned: key j visible to query i iff j <= i + Lk - Lq
    scale: float
    batch_shape: Tuple[int, ...]
    num_heads_q: int
    num_heads_kv: int
    len_q: int
    len_k: int
    head_dim: int
    head_dim_v: int
    dtype: np.dtype
    has_head_axis: bool
    q_shape: Tuple[int, ...]         # the caller's shapes, for reducing gradients of broadcast inputs
    k_shape: Tuple[int, ...]
    v_shape: Tuple[int, ...]
    device_id: Optional[int]         # CUDA device for CuPy inputs, None for NumPy

    @property
    def library(self) -> str:
        return "numpy" if self.xp is np else "cupy"

    @property
    def group_size(self) -> int:
        """Query heads sharing one key/value head (1 = plain multi-head attention)."""
        return self.num_heads_q // self.num_heads_kv

    @property
    def batch_size(self) -> int:
        return math.prod(self.batch_shape)

    @property
    def compute_dtype(self) -> np.dtype:
        """Accumulation dtype: float64 for float64 inputs, float32 otherwise."""
        return FLOAT64 if self.dtype == FLOAT64 else FLOAT32

    @property
    def lse_dtype(self) -> np.dtype:
        return self.compute_dtype

    @property
    def out_shape(self) -> Tuple[int, ...]:
        full = self.batch_shape + (self.num_heads_q, self.len_q, self.head_dim_v)
        return full if self.has_head_axis else full[-2:]

    @property
    def lse_shape(self) -> Tuple[int, ...]:
        full = self.batch_shape + (self.num_heads_q, self.len_q)
        return full if self.has_head_axis else full[-1:]

    @property
    def is_empty(self) -> bool:
        """True when there is no output row at all (batch 0, Hq 0 or Lq 0)."""
        return self.batch_size == 0 or self.num_heads_q == 0 or self.len_q == 0

    def public_out(self, internal):
        """Drop the head axis added for rank-2 inputs."""
        return internal if self.has_head_axis else internal.reshape(internal.shape[-2:])

    def public_lse(self, internal):
        return internal if self.has_head_axis else internal.reshape(internal.shape[-1:])

    def internal(self, public, heads):
        """Inverse of public_out / public_lse: give rank-2 arrays their head axis back."""
        return public if self.has_head_axis else public.reshape((heads,) + public.shape)

    def describe(self) -> str:
        return (f"batch {self.batch_shape}, Hq={self.num_heads_q}, Hkv={self.num_heads_kv}, "
                f"Lq={self.len_q}, Lk={self.len_k}, D={self.head_dim}, Dv={self.head_dim_v}, "
                f"{dtype_name(self.dtype)}, causal={self.causal}, mask={self.mask_kind}")


class _Shapes:
    """The three input shapes for error messages, formatted only when a message needs them."""

    def __init__(self, q, k, v):
        self.shapes = (tuple(q.shape), tuple(k.shape), tuple(v.shape))

    def __str__(self):
        q, k, v = self.shapes
        return f"q {q}, k {k}, v {v}"


def _check_dtype(name, array):
    dt = np.dtype(array.dtype)
    if dt not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {dtype_name(dt)}; supported: float16, bfloat16, float32, float64")
    return dt


def normalize(q, k, v, *, causal=False, scale=None, mask=None) -> Problem:
    """Validate the forward arguments and build the Problem (no data is copied)."""
    libraries = {name: library_of(name, a) for name, a in (("q", q), ("k", k), ("v", v))}
    if mask is not None:
        libraries["mask"] = library_of("mask", mask)
    if len(set(libraries.values())) != 1:
        listing = ", ".join(f"{n} is {lib}" for n, lib in libraries.items())
        raise TypeError(f"q, k, v and mask must all be NumPy or all CuPy arrays ({listing})")
    library = libraries["q"]
    cupy = _cupy_or_none()
    xp = np if library == "numpy" else cupy

    device_id = None
    if library == "cupy":
        # data.device_id is what a.device.id reads, without making a Device object each time
        devices = {n: a.data.device_id for n, a in (("q", q), ("k", k), ("v", v), ("mask", mask)) if a is not None}
        if len(set(devices.values())) != 1:
            raise ValueError(f"q, k, v and mask must be on one CUDA device, got {devices}")
        device_id = devices["q"]

    dtypes = {n: _check_dtype(n, a) for n, a in (("q", q), ("k", k), ("v", v))}
    if len(set(dtypes.values())) != 1:
        listing = ", ".join(f"{n}: {dtype_name(d)}" for n, d in dtypes.items())
        raise TypeError(f"q, k and v must share one dtype ({listing})")
    dtype = dtypes["q"]

    ranks = {n: a.ndim for n, a in (("q", q), ("k", k), ("v", v))}
    shapes = _Shapes(q, k, v)
    if min(ranks.values()) < 2:
        raise ValueError(f"q, k and v need at least 2 dimensions (..., L, D); got {shapes}")
    has_head_axis = max(ranks.values()) > 2
    if has_head_axis and min(ranks.values()) < 3:
        raise ValueError(
            f"q, k and v must all have a head axis (..., H, L, D) or all be plain (L, D) matrices; got {shapes}")

    q_shape, k_shape, v_shape = tuple(q.shape), tuple(k.shape), tuple(v.shape)
    if not has_head_axis:
        q, k, v = q[None], k[None], v[None]

    *q_batch, num_heads_q, len_q, head_dim = q.shape
    *k_batch, num_heads_kv, len_k, head_dim_k = k.shape
    *v_batch, num_heads_v, len_v, head_dim_v = v.shape
    if head_dim_k != head_dim:
        raise ValueError(f"q and k must have the same head dim D (last axis); got {shapes}")
    if head_dim == 0:
        raise ValueError(f"head dim D must be at least 1; got {shapes}")
    if (num_heads_v, len_v) != (num_heads_kv, len_k):
        raise ValueError(f"k and v must have the same number of heads and keys (axes -3 and -2); got {shapes}")
    if num_heads_kv == 0 or num_heads_q % num_heads_kv != 0:
        raise ValueError(
            f"query heads Hq={num_heads_q} must be a multiple of key/value heads Hkv={num_heads_kv}; got {shapes}")
    try:
        if q_batch == k_batch == v_batch:     # the common case, without numpy's general rule
            batch_shape = tuple(q_batch)
        else:
            batch_shape = tuple(np.broadcast_shapes(tuple(q_batch), tuple(k_batch), tuple(v_batch)))
    except ValueError:
        raise ValueError(f"the batch dims (all axes before H, L, D) of q, k and v do not broadcast; got {shapes}") from None

    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    else:
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise TypeError(f"scale must be a real number or None, got {scale!r}") from None
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")

    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be True or False, got {causal!r}")

    def broadcast(a, tail):
        shape = batch_shape + tail
        return a if a.shape == shape else xp.broadcast_to(a, shape)

    q = broadcast(q, (num_heads_q, len_q, head_dim))
    k = broadcast(k, (num_heads_kv, len_k, head_dim))
    v = broadcast(v, (num_heads_kv, len_k, head_dim_v))

    mask_kind = None
    if mask is not None:
        mdt = np.dtype(mask.dtype)
        if mdt == np.bool_:
            mask_kind = "bool"
        elif mdt in SUPPORTED_DTYPES:
            mask_kind = "bias"
        else:
            raise TypeError(f"mask must be boolean (True = may attend) or a float additive bias, got dtype {dtype_name(mdt)}")
        scores_shape = batch_shape + (num_heads_q, len_q, len_k)
        public_scores = scores_shape if has_head_axis else scores_shape[-2:]
        try:
            fits = tuple(np.broadcast_shapes(tuple(mask.shape), public_scores)) == public_scores
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to the scores' shape "
                f"{public_scores} (..., Hq, Lq, Lk); {shapes}")
        mask = xp.broadcast_to(mask, scores_shape)

    return Problem(
        xp=xp, q=q, k=k, v=v, mask=mask, mask_kind=mask_kind, causal=bool(causal), scale=scale,
        batch_shape=batch_shape, num_heads_q=num_heads_q, num_heads_kv=num_heads_kv,
        len_q=len_q, len_k=len_k, head_dim=head_dim, head_dim_v=head_dim_v, dtype=dtype,
        has_head_axis=has_head_axis, q_shape=q_shape, k_shape=k_shape, v_shape=v_shape,
        device_id=device_id)


def normalize_backward(problem: Problem, dout, out, lse):
    """Check the backward-only arguments against the forward Problem; returns internal views."""
    for name, a, shape, dtype in (("dout", dout, problem.out_shape, problem.dtype),
                                  ("out", out, problem.out_shape, problem.dtype),
                                  ("lse", lse, problem.lse_shape, problem.lse_dtype)):
        if library_of(name, a) != problem.library:
            raise TypeError(f"{name} is {library_of(name, a)} but q, k, v are {problem.library}")
        if tuple(a.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)} (as returned by the forward), got {tuple(a.shape)}")
        if np.dtype(a.dtype) != dtype:
            raise TypeError(f"{name} must have dtype {dtype_name(dtype)}, got {dtype_name(a.dtype)}")
        if problem.library == "cupy" and a.device.id != problem.device_id:
            raise ValueError(f"{name} is on device {a.device.id}, q on {problem.device_id}")
    heads = problem.num_heads_q
    return (problem.internal(dout, heads), problem.internal(out, heads), problem.internal(lse, heads))


def unbroadcast(grad, shape, has_head_axis):
    """Sum a gradient computed on broadcast views back to the caller's input shape."""
    if not has_head_axis:
        return grad.reshape(shape)
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad
