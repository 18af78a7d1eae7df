"""Flash backward kernels (cupyattn/_flash_bwd.py) against the float64 reference.

Every test calls `_flash_bwd.flash_backward` directly, so no fallback backend can pass for it,
with the mma.sync kernels (the Hopper main kernel is switched off here and tested on its own).
The rule: each of dq, dk, dv within 3x the eager backend's error in the same dtype plus
tolerance(dtype), errors measured relative to the size of the summed terms.
"""
import numpy as np
import pytest

import cupyattn
from cupyattn._problem import normalize, normalize_backward, unbroadcast
from reference import as_float64, reference_backward, rel_error
from strategies import BFLOAT16, Case, make_inputs, tolerance

pytestmark = pytest.mark.gpu

SHAPES = [(113, 203), (128, 217), (256, 512), (512, 256), (1, 239), (1023, 1024)]
DIMS = [32, 59, 64, 96, 128, 256]


@pytest.fixture(autouse=True)
def poison_and_mma_sync():
    """Poisoned outputs, and the mma.sync kernels even on sm_90 (the Hopper main kernel has its
    own tests, tests/test_flash_bwd_sm90.py)."""
    from cupyattn import _flash_bwd, _flash_bwd_sm90
    _flash_bwd.POISON_OUTPUTS = True
    _flash_bwd_sm90.HOPPER_BACKWARD = False
    yield
    _flash_bwd.POISON_OUTPUTS = False
    _flash_bwd_sm90.HOPPER_BACKWARD = True


def _forward(inputs, case):
    """out and lse from the eager forward (independent of the flash forward)."""
    return cupyattn.attention(inputs["q"], inputs["k"], inputs["v"], backend="eager", return_lse=True,
                              **case.kwargs(inputs))


def flash_grads(inputs, case, dout, out, lse, deterministic=False):
    """flash_backward's gradients, summed back to the inputs' shapes and cast like the API does."""
    from cupyattn._flash_bwd import backward_reasons, flash_backward
    problem = normalize(inputs["q"], inputs["k"], inputs["v"], **case.kwargs(inputs))
    assert backward_reasons(problem) == [], backward_reasons(problem)
    d_int, o_int, l_int = normalize_backward(problem, dout, out, lse)
    dq, dk, dv = flash_backward(problem, d_int, o_int, l_int, deterministic=deterministic)
    assert dq.shape == problem.q.shape and dk.shape == problem.k.shape and dv.shape == problem.v.shape
    return tuple(unbroadcast(g, s, problem.has_head_axis).astype(problem.dtype)
                 for g, s in ((dq, problem.q_shape), (dk, problem.k_shape), (dv, problem.v_shape)))


def check_case(case, deterministic=False, inputs=None):
    import cupy
    inputs = inputs if inputs is not None else make_inputs(cupy, case)
    out, lse = _forward(inputs, case)
    rng = np.random.default_rng(case.seed + 1)
    dout = cupy.asarray(rng.standard_normal(out.shape).astype(out.dtype))
    grads = flash_grads(inputs, case, dout, out, lse, deterministic)
    eager = cupyattn.attention_backward(dout, inputs["q"], inputs["k"], inputs["v"], out, lse, backend="eager",
                                        **case.kwargs(inputs))
    refs, mags = reference_backward(dout, inputs["q"], inputs["k"], inputs["v"], **case.kwargs(inputs),
                                    magnitudes=True)
    report = {}
    for name, g, e, ref, mag in zip("qkv", grads, eager, refs, mags):
        assert g.shape == inputs[name].shape and g.dtype == inputs[name].dtype, name
        err, eager_err = rel_error(g, ref, magnitude=mag), rel_error(e, ref, magnitude=mag)
        report[name] = (err, eager_err)
        assert err <= 3 * eager_err + tolerance(case.dtype), (name, err, eager_err, case)
    return grads, report


def _grid():
    """Each (Lq, Lk) x D once per dtype, causal and GQA cycling so every pairing shows up."""
    out = []
    for i, (lq, lk) in enumerate(SHAPES):
        for j, d in enumerate(DIMS):
            causal = (i + j) % 2 == 1
            group = 1 + (i + j // 2) % 2
            for dtype in (np.dtype(np.float16), BFLOAT16):
                out.append(pytest.param(
                    Case(batch=(1,), heads_q=2, heads_kv=2 // group, len_q=lq, len_k=lk, head_dim=d,
                         head_dim_v=d, dtype=dtype, causal=causal, seed=100 * i + j),
                    id=f"{lq}x{lk}-d{d}-{'causal' if causal else 'full'}-g{group}-{np.dtype(dtype).name}"))
    return out


@pytest.mark.parametrize("case", _grid())
def test_grid(case):
    check_case(case)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("d", [64, 128])
def test_causal_and_gqa_both_dtypes(causal, group, d):
    for dtype in (np.dtype(np.float16), BFLOAT16):
        check_case(Case(batch=(2,), heads_q=4, heads_kv=4 // group, len_q=200, len_k=331, head_dim=d,
                        head_dim_v=d, dtype=dtype, causal=causal, seed=7))


@pytest.mark.parametrize("mask", ["bool", "bias", "bool_empty_rows"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [40, 128, 256])
def test_masks(mask, causal, d):
    check_case(Case(batch=(2,), heads_q=2, heads_kv=1, len_q=150, len_k=277, head_dim=d, head_dim_v=d,
                    dtype=BFLOAT16, causal=causal, mask=mask, seed=3))


@pytest.mark.parametrize("d,dv", [(64, 32), (40, 128), (128, 72), (200, 256), (256, 8)])
def test_value_dim_differs(d, dv):
    check_case(Case(batch=(1,), heads_q=3, heads_kv=1, len_q=97, len_k=300, head_dim=d, head_dim_v=dv,
                    dtype=np.dtype(np.float16), causal=d % 128 == 0, seed=5))


@pytest.mark.parametrize("causal,mask", [(False, None), (True, "bool_empty_rows"), (False, "bias")])
def test_deterministic_is_bitwise_reproducible_and_accurate(causal, mask):
    import cupy
    case = Case(batch=(2,), heads_q=4, heads_kv=2, len_q=300, len_k=517, head_dim=96, head_dim_v=96,
                dtype=BFLOAT16, causal=causal, mask=mask, seed=9)
    inputs = make_inputs(cupy, case)
    first, _ = check_case(case, deterministic=True, inputs=inputs)
    second, _ = check_case(case, deterministic=True, inputs=inputs)
    for a, b in zip(first, second):
        assert cupy.array_equal(a.view(np.uint16), b.view(np.uint16))


def test_deterministic_raw_float32_bits():
    """Compare the float32 outputs of flash_backward itself (before any cast) over two runs."""
    import cupy
    from cupyattn._flash_bwd import flash_backward
    case = Case(batch=(1,), heads_q=4, heads_kv=1, len_q=700, len_k=900, head_dim=64, head_dim_v=64,
                dtype=BFLOAT16, causal=True, seed=21)
    inputs = make_inputs(cupy, case)
    out, lse = _forward(inputs, case)
    dout = cupy.asarray(np.random.default_rng(0).standard_normal(out.shape).astype(out.dtype))
    problem = normalize(inputs["q"], inputs["k"], inputs["v"], **case.kwargs(inputs))
    args = normalize_backward(problem, dout, out, lse)
    runs = [flash_backward(problem, *args, deterministic=True) for _ in range(2)]
    for a, b in zip(*runs):
        assert cupy.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_fully_masked_rows_give_zero_gradients():
    import cupy
    case = Case(batch=(1,), heads_q=2, heads_kv=1, len_q=90, len_k=70, head_dim=64, head_dim_v=64,
                dtype=BFLOAT16, mask="bool_empty_rows", seed=12)
    inputs = make_inputs(cupy, case)
    for deterministic in (False, True):
        (dq, dk, dv), _ = check_case(case, deterministic=deterministic, inputs=inputs)
        empty = ~as_float64(inputs["mask"]).astype(bool).any(-1)
        for g in (dq, dk, dv):
            assert np.all(np.isfinite(as_float64(g)))
        assert np.all(as_float64(dq)[..., empty, :] == 0)


def test_causal_rows_that_see_nothing():
    # Lq > Lk with bottom-right causal: the first Lq - Lk queries see no key at all
    case = Case(batch=(1,), heads_q=2, heads_kv=2, len_q=300, len_k=100, head_dim=64, head_dim_v=64,
                dtype=np.dtype(np.float16), causal=True, seed=4)
    for deterministic in (False, True):
        (dq, dk, dv), _ = check_case(case, deterministic=deterministic)
        dq = as_float64(dq)
        assert np.all(np.isfinite(dq)) and np.all(dq[..., :200, :] == 0)


def test_strided_and_broadcast_inputs():
    """q a non-contiguous slice, k broadcast over the batch (stride 0), v transposed in memory
    with a contiguous last axis, a mask broadcast over batch and heads."""
    import cupy
    rng = np.random.default_rng(17)
    dt = BFLOAT16
    big_q = cupy.asarray(rng.standard_normal((3, 2, 6, 130, 72)).astype(dt))
    q = big_q[:, 1, 1:5, :, :64]                          # (3, 4, 130, 64), strided batch/heads/rows
    k = cupy.asarray(rng.standard_normal((1, 2, 190, 64)).astype(dt))       # broadcast over batch
    v_store = cupy.asarray(rng.standard_normal((190, 3, 2, 48)).astype(dt))
    v = v_store.transpose(1, 2, 0, 3)                     # (3, 2, 190, 48), rows strided by 3*2*48
    mask = cupy.asarray(rng.random((130, 190)) < 0.8)
    case = Case(batch=(3,), heads_q=4, heads_kv=2, len_q=130, len_k=190, head_dim=64, head_dim_v=48,
                dtype=dt, causal=True, mask="bool", seed=0)
    inputs = {"q": q, "k": k, "v": v, "mask": mask}
    for deterministic in (False, True):
        check_case(case, deterministic=deterministic, inputs=inputs)


def test_more_than_two_batch_levels():
    import cupy
    rng = np.random.default_rng(19)
    dt = np.dtype(np.float16)
    big = cupy.asarray(rng.standard_normal((2, 3, 5, 2, 70, 32)).astype(dt))
    q = big[:, :, ::2]                                   # batch (2, 3, 3): three non-mergeable levels
    k = cupy.asarray(rng.standard_normal((2, 3, 3, 1, 90, 32)).astype(dt))
    v = cupy.asarray(rng.standard_normal((2, 1, 3, 1, 90, 32)).astype(dt))
    case = Case(batch=(2, 3, 3), heads_q=2, heads_kv=1, len_q=70, len_k=90, head_dim=32, head_dim_v=32,
                dtype=dt, causal=False, seed=0)
    check_case(case, inputs={"q": q, "k": k, "v": v})


def test_rank2_inputs_and_odd_scale():
    import cupy
    case = Case(batch=(), heads_q=1, heads_kv=1, len_q=77, len_k=133, head_dim=59, head_dim_v=33,
                dtype=BFLOAT16, causal=True, scale=0.37, seed=2)
    inputs = make_inputs(cupy, case)
    inputs = {n: a[0] for n, a in inputs.items()}        # (L, D) matrices, no head axis
    check_case(case, inputs=inputs)
