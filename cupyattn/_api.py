"""The public entry points: attention, attention_backward and explain."""
from __future__ import annotations

import contextlib

import numpy as np

from . import _registry
from ._problem import Problem, normalize, normalize_backward, unbroadcast


def _on_device(problem: Problem):
    """Run CuPy work on the inputs' device (and the caller's current stream on it)."""
    if problem.library == "cupy":
        return problem.xp.cuda.Device(problem.device_id)
    return contextlib.nullcontext()


def _check_backend_name(backend):
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {backend!r}")
    if backend != "auto":
        _registry.get(backend)


def attention(q, k, v, *, causal=False, scale=None, mask=None, backend="auto", return_lse=False):
    """softmax(q @ k^T * scale + bias, hidden keys removed) @ v.

    q: (..., Hq, Lq, D), k: (..., Hkv, Lk, D), v: (..., Hkv, Lk, Dv), all NumPy (computed on the
    CPU) or all CuPy (computed on their device, on the current stream). Returns out
    (..., Hq, Lq, Dv) in q's dtype and, with return_lse=True, also lse (..., Hq, Lq), the natural
    log of each row's softmax denominator, in float32 (float64 for float64 inputs).

    causal: query i sees key j iff j <= i + (Lk - Lq) (aligned to the bottom-right corner).
    mask: boolean (True = may attend) or additive float bias, broadcastable to (..., Hq, Lq, Lk).
    A row that sees no key gives output 0 and lse -inf.
    """
    _check_backend_name(backend)
    problem = normalize(q, k, v, causal=causal, scale=scale, mask=mask)
    chosen = _registry.select(problem, backend, "forward")
    with _on_device(problem):
        if problem.is_empty or problem.len_k == 0:
            out, lse = _no_keys_forward(problem)
        else:
            out, lse = chosen.forward(problem, return_lse)
    out = problem.public_out(out)
    return (out, problem.public_lse(lse)) if return_lse else out


def attention_backward(dout, q, k, v, out, lse, *, causal=False, scale=None, mask=None, backend="auto",
                       deterministic=False):
    """Gradients (dq, dk, dv) of attention, given the forward's out and lse and the output gradient.

    Takes the same keywords as the forward (they must match it). Gradients of inputs that were
    broadcast over batch dims are summed back to the input's shape. No gradient flows to mask.

    deterministic: the flash backward adds dq up with float32 atomics by default, the fastest way,
    so dq can differ in its last bits from run to run (dk and dv never do); True computes dq in a
    separate pass (about 1.4x the backward's work) and gives the same bits every run. The eager and
    chunked backends are deterministic either way.
    """
    _check_backend_name(backend)
    problem = normalize(q, k, v, causal=causal, scale=scale, mask=mask)
    dout, out, lse = normalize_backward(problem, dout, out, lse)
    chosen = _registry.select(problem, backend, "backward")
    xp = problem.xp
    with _on_device(problem):
        if problem.is_empty or problem.len_k == 0:
            dq = xp.zeros(problem.q.shape, problem.compute_dtype)
            dk = xp.zeros(problem.k.shape, problem.compute_dtype)
            dv = xp.zeros(problem.v.shape, problem.compute_dtype)
        else:
            dq, dk, dv = chosen.backward(problem, dout, out, lse, deterministic=bool(deterministic))
        grads = []
        for grad, shape in ((dq, problem.q_shape), (dk, problem.k_shape), (dv, problem.v_shape)):
            grads.append(unbroadcast(grad, shape, problem.has_head_axis).astype(problem.dtype, copy=False))
    return tuple(grads)


def explain(q, k, v, *, causal=False, scale=None, mask=None, backend="auto", return_lse=False,
            direction="forward"):
    """Which backend `attention` (or, with direction="backward", `attention_backward`) would run
    on these inputs, and why each other backend would not. Computes nothing on the inputs."""
    _check_backend_name(backend)
    problem = normalize(q, k, v, causal=causal, scale=scale, mask=mask)
    return _registry.explain(problem, backend, direction)


def _no_keys_forward(problem: Problem):
    """Outputs when there is no row to compute or no key to see: zeros and lse = -inf."""
    xp = problem.xp
    rows = problem.batch_shape + (problem.num_heads_q, problem.len_q)
    out = xp.zeros(rows + (problem.head_dim_v,), problem.dtype)
    lse = xp.full(rows, -np.inf, problem.lse_dtype)
    return out, lse
