"""The eager backend: the formula as written, in array code that runs on NumPy and CuPy alike.

It materialises the whole (Lq, Lk) score matrix per head in the accumulation dtype, so its memory
is O(Lq * Lk); it is the readable baseline the kernels are checked against.
"""
from __future__ import annotations

import contextlib

import numpy as np

from ._problem import Problem
from ._registry import Backend


def _errstate(xp):
    # log(0) = -inf is how a row with no visible key gets lse = -inf; NumPy would warn about it.
    return np.errstate(divide="ignore", invalid="ignore") if xp is np else contextlib.nullcontext()


def grouped(problem: Problem, a):
    """View a per-query-head array (..., Hq, X, Y) as (..., Hkv, G, X, Y) for grouped-query attention."""
    *batch, _, x, y = a.shape
    return a.reshape(tuple(batch) + (problem.num_heads_kv, problem.group_size, x, y))


def causal_allowed(xp, len_q: int, len_k: int):
    """Bottom-right causal mask: query i may see key j iff j <= i + (Lk - Lq)."""
    return xp.arange(len_k)[None, :] <= xp.arange(len_q)[:, None] + (len_k - len_q)


def visible_scores(problem: Problem, q_rows=slice(None)):
    """Scaled scores with bias added and hidden keys set to -inf, grouped: (..., Hkv, G, Lq', Lk).

    `q_rows` selects a block of query rows (used by the chunked backend on NumPy).
    """
    xp, ct = problem.xp, problem.compute_dtype
    q = grouped(problem, problem.q[..., q_rows, :]).astype(ct)
    k = problem.k.astype(ct)[..., None, :, :]
    scores = (q @ xp.swapaxes(k, -1, -2)) * ct.type(problem.scale)
    rows = range(problem.len_q)[q_rows]
    allowed = None
    if problem.causal:
        allowed = causal_allowed(xp, problem.len_q, problem.len_k)[rows.start:rows.stop:rows.step]
    if problem.mask is not None:
        mask = grouped(problem, problem.mask[..., q_rows, :])
        if problem.mask_kind == "bias":
            scores = scores + mask.astype(ct)
        else:
            allowed = mask if allowed is None else (allowed & mask)
    if allowed is not None:
        scores = xp.where(allowed, scores, ct.type(-np.inf))
    return scores


def softmax_rows(xp, scores):
    """(P, lse) of a score block whose hidden entries are -inf; empty rows give P = 0, lse = -inf."""
    row_max = scores.max(axis=-1, keepdims=True)
    # A row with every key hidden has max -inf; subtracting 0 instead keeps exp() at 0, not NaN.
    # NaN (from a NaN input) is left alone so it propagates.
    shift = xp.where(row_max == -np.inf, 0, row_max)
    weights = xp.exp(scores - shift)
    row_sum = weights.sum(axis=-1, keepdims=True)
    probs = weights / xp.where(row_sum == 0, 1, row_sum)
    lse = (shift + xp.log(row_sum))[..., 0]
    return probs, lse


def probs_from_lse(xp, scores, lse):
    """Recompute P = exp(S - lse) from the saved lse; rows with lse = -inf have P = 0."""
    safe = xp.where(lse == -np.inf, 0, lse)
    return xp.exp(scores - safe[..., None])


class EagerBackend(Backend):
    name = "eager"

    def notes(self, problem):
        scores_bytes = problem.batch_size * problem.num_heads_q * problem.len_q * problem.len_k \
            * problem.compute_dtype.itemsize
        return [f"materialises {scores_bytes / 2**20:.1f} MiB of scores per intermediate"]

    def forward(self, problem, want_lse):
        xp = problem.xp
        with _errstate(xp):
            probs, lse = softmax_rows(xp, visible_scores(problem))
            v = problem.v.astype(problem.compute_dtype)[..., None, :, :]
            out = probs @ v
        shape = problem.batch_shape + (problem.num_heads_q, problem.len_q)
        return (out.reshape(shape + (problem.head_dim_v,)).astype(problem.dtype),
                lse.reshape(shape).astype(problem.lse_dtype))

    def backward(self, problem, dout, out, lse, deterministic=False):
        xp, ct = problem.xp, problem.compute_dtype
        with _errstate(xp):
            probs = probs_from_lse(xp, visible_scores(problem), grouped(problem, lse[..., None])[..., 0])
            dout = grouped(problem, dout).astype(ct)
            out = grouped(problem, out).astype(ct)
            q = grouped(problem, problem.q).astype(ct)
            k = problem.k.astype(ct)[..., None, :, :]
            v = problem.v.astype(ct)[..., None, :, :]
            dv = (xp.swapaxes(probs, -1, -2) @ dout).sum(axis=-3)
            dprobs = dout @ xp.swapaxes(v, -1, -2)
            delta = (dout * out).sum(axis=-1, keepdims=True)
            dscores = probs * (dprobs - delta) * ct.type(problem.scale)
            dq = dscores @ k
            dk = (xp.swapaxes(dscores, -1, -2) @ q).sum(axis=-3)
        return dq.reshape(problem.q.shape), dk, dv

