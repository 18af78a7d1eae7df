"""Hypothesis strategies shared by every test: attention problems and their random inputs.

A `Case` holds only sizes and flags; `make_inputs` draws the arrays from a seeded generator, which
is much faster than letting hypothesis generate array contents element by element.
"""
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import numpy as np
import ml_dtypes
from hypothesis import strategies as st

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
ALL_DTYPES = (np.dtype(np.float16), BFLOAT16, np.dtype(np.float32), np.dtype(np.float64))
HALF_DTYPES = ALL_DTYPES[:2]


@dataclass(frozen=True)
class Case:
    batch: Tuple[int, ...] = (1,)
    heads_q: int = 2
    heads_kv: int = 1
    len_q: int = 16
    len_k: int = 16
    head_dim: int = 32
    head_dim_v: int = 32
    dtype: np.dtype = np.dtype(np.float32)
    causal: bool = False
    mask: Optional[str] = None       # None, "bool", "bias", "bool_empty_rows" (some rows see nothing)
    scale: Optional[float] = None
    seed: int = 0

    def with_(self, **kw):
        return replace(self, **kw)

    def kwargs(self, inputs):
        return dict(causal=self.causal, scale=self.scale, mask=inputs.get("mask"))


def make_inputs(xp, case: Case):
    """q, k, v (and mask) for `case` on the array library xp, from the case's seed."""
    rng = np.random.default_rng(case.seed)

    def normal(*shape):
        return rng.standard_normal(shape).astype(case.dtype)

    q = normal(*case.batch, case.heads_q, case.len_q, case.head_dim)
    k = normal(*case.batch, case.heads_kv, case.len_k, case.head_dim)
    v = normal(*case.batch, case.heads_kv, case.len_k, case.head_dim_v)
    inputs = {"q": q, "k": k, "v": v}
    if case.mask == "bias":
        # broadcast over batch and heads: (Lq, Lk)
        inputs["mask"] = rng.standard_normal((case.len_q, case.len_k)).astype(case.dtype)
    elif case.mask in ("bool", "bool_empty_rows"):
        # broadcast over batch: (Hq, Lq, Lk)
        m = rng.random((case.heads_q, case.len_q, case.len_k)) < 0.7
        if case.mask == "bool_empty_rows":
            m[:, ::3, :] = False
        inputs["mask"] = m
    if xp is not np:
        inputs = {name: xp.asarray(a) for name, a in inputs.items()}
    return inputs


@st.composite
def cases(draw, dtypes=ALL_DTYPES, max_len=300, max_dim=256, masks=(None, "bool", "bias", "bool_empty_rows"),
          causal=(False, True), batch_shapes=((), (1,), (2,), (2, 1))):
    """Attention problems: odd lengths, Lq != Lk, GQA ratios, head dims 1..max_dim, masks, scales."""
    heads_kv = draw(st.sampled_from((1, 2)))
    group = draw(st.sampled_from((1, 2, 3)))
    small = st.integers(1, 40)
    any_len = st.integers(1, max_len)
    len_q = draw(st.one_of(small, any_len))
    len_k = draw(st.one_of(small, any_len))
    head_dim = draw(st.one_of(st.sampled_from((1, 8, 16, 32, 64, 128)), st.integers(1, max_dim)))
    head_dim_v = draw(st.one_of(st.just(head_dim), st.integers(1, max_dim)))
    return Case(
        batch=draw(st.sampled_from(batch_shapes)),
        heads_q=heads_kv * group, heads_kv=heads_kv,
        len_q=len_q, len_k=len_k, head_dim=head_dim, head_dim_v=head_dim_v,
        dtype=draw(st.sampled_from(dtypes)),
        causal=draw(st.sampled_from(causal)),
        mask=draw(st.sampled_from(masks)),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 1.0))),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def tolerance(dtype) -> float:
    """Norm-relative error allowed for one result in `dtype` against the float64 reference.

    Half-precision outputs are dominated by the final rounding (at most eps/2 per element);
    float32/float64 by accumulating over at most a few hundred keys and head-dim terms.
    """
    dtype = np.dtype(dtype)
    eps = float(ml_dtypes.finfo(dtype).eps) if dtype == BFLOAT16 else float(np.finfo(dtype).eps)
    return eps if dtype in HALF_DTYPES else 256 * eps


def lse_tolerance(dtype) -> float:
    """lse is float32 for all but float64 inputs."""
    return 256 * float(np.finfo(np.float64 if np.dtype(dtype) == np.float64 else np.float32).eps)
