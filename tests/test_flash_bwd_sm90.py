"""The Hopper (sm_90a) backward main kernel (kernels_cu/flash_bwd_sm90.cu) through
`_flash_bwd.flash_backward`, each case first asserting that this kernel is the one that runs
(`_flash_bwd_sm90.supports` empty), so a fallback to the mma.sync kernel cannot pass for it.
Same rule as tests/test_flash_bwd.py: dq, dk, dv each within 3x eager's error plus tolerance.
GPU tests skip where the device is not sm_90."""
import numpy as np
import pytest

from cupyattn import _flash_bwd, _flash_bwd_sm90
from cupyattn._problem import BFLOAT16, normalize
from reference import as_float64
from strategies import Case, make_inputs
from test_flash_bwd import check_case
from test_flash_sm90 import SM90_MISSING

sm90_only = pytest.mark.skipif(SM90_MISSING is not None, reason=f"sm90 backward: {SM90_MISSING}")

SHAPES = [(113, 203), (128, 217), (256, 512), (512, 256), (1, 239), (1023, 1024), (300, 129)]
FP16 = np.dtype(np.float16)


@pytest.fixture(autouse=True)
def poison():
    _flash_bwd.POISON_OUTPUTS = True
    yield
    _flash_bwd.POISON_OUTPUTS = False


def _check(case, inputs=None):
    import cupy
    inputs = inputs if inputs is not None else make_inputs(cupy, case)
    problem = normalize(inputs["q"], inputs["k"], inputs["v"], **case.kwargs(inputs))
    assert _flash_bwd_sm90.supports(problem) == [], _flash_bwd_sm90.supports(problem)
    return check_case(case, inputs=inputs)


@pytest.mark.gpu
@sm90_only
@pytest.mark.parametrize("dtype", [pytest.param(BFLOAT16, id="bf16"), pytest.param(FP16, id="fp16")])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lq,lk", SHAPES)
@pytest.mark.parametrize("d", _flash_bwd_sm90.HEAD_DIMS)
def test_shape_grid(d, lq, lk, causal, group, dtype):
    case = Case(batch=(2,), heads_q=4, heads_kv=4 // group, len_q=lq, len_k=lk, head_dim=d,
                head_dim_v=d, dtype=dtype, causal=causal, seed=lq + 7 * lk + group + d)
    _check(case)


@pytest.mark.gpu
@sm90_only
def test_causal_rows_that_see_nothing():
    """Lq > Lk, bottom-right causal: the first Lq - Lk queries see no key (dq = 0 there, no NaN)."""
    case = Case(batch=(1,), heads_q=2, heads_kv=1, len_q=300, len_k=100, head_dim=128, head_dim_v=128,
                dtype=FP16, causal=True, seed=4)
    (dq, dk, dv), _ = _check(case)
    dq = as_float64(dq)
    assert np.all(np.isfinite(dq)) and np.all(dq[..., :200, :] == 0)
    assert np.all(np.isfinite(as_float64(dk))) and np.all(np.isfinite(as_float64(dv)))


@pytest.mark.gpu
@sm90_only
@pytest.mark.parametrize("d", _flash_bwd_sm90.HEAD_DIMS)
def test_many_blocks_and_long_rows(d):
    """More key blocks than SMs, several query tiles per block, GQA summed in the block."""
    case = Case(batch=(3,), heads_q=8, heads_kv=2, len_q=1500, len_k=2100, head_dim=d, head_dim_v=d,
                dtype=BFLOAT16, causal=True, seed=5)
    _check(case)


@pytest.mark.gpu
@sm90_only
def test_strided_and_broadcast_inputs():
    """q a strided slice, k broadcast over the batch (stride 0), v in (B, L, H, D) storage."""
    import cupy
    rng = np.random.default_rng(17)
    dt = BFLOAT16
    big_q = cupy.asarray(rng.standard_normal((3, 2, 6, 130, 136)).astype(dt))
    q = big_q[:, 1, 1:5, :, :128]                         # (3, 4, 130, 128), strided batch/heads/rows
    k = cupy.asarray(rng.standard_normal((1, 2, 190, 128)).astype(dt))      # broadcast over batch
    v = cupy.asarray(rng.standard_normal((3, 190, 2, 128)).astype(dt)).transpose(0, 2, 1, 3)
    for causal in (False, True):
        case = Case(batch=(3,), heads_q=4, heads_kv=2, len_q=130, len_k=190, head_dim=128, head_dim_v=128,
                    dtype=dt, causal=causal, seed=0)
        _check(case, inputs={"q": q, "k": k, "v": v})


@pytest.mark.gpu
@sm90_only
def test_more_than_two_batch_levels_and_scale():
    import cupy
    rng = np.random.default_rng(19)
    big = cupy.asarray(rng.standard_normal((2, 3, 5, 2, 70, 128)).astype(FP16))
    q = big[:, :, ::2]                                   # batch (2, 3, 3): three non-mergeable levels
    k = cupy.asarray(rng.standard_normal((2, 3, 3, 1, 90, 128)).astype(FP16))
    v = cupy.asarray(rng.standard_normal((2, 1, 3, 1, 90, 128)).astype(FP16))
    case = Case(batch=(2, 3, 3), heads_q=2, heads_kv=1, len_q=70, len_k=90, head_dim=128, head_dim_v=128,
                dtype=FP16, causal=False, scale=-0.3, seed=0)
    _check(case, inputs={"q": q, "k": k, "v": v})


def test_dispatch_reasons_cpu():
    """Which problems go to the Hopper backward (CPU: only the reasons that need no device)."""
    q = np.zeros((1, 4, 100, 128), np.float16)
    k = np.zeros((1, 2, 80, 128), np.float16)
    why = " | ".join(_flash_bwd_sm90.supports(normalize(q, k, k), deterministic=True))
    assert "deterministic" in why and "NumPy" in why
    assert "head dim 96" in " | ".join(_flash_bwd_sm90.supports(normalize(q[..., :96], k[..., :96], k[..., :96])))
    assert "mask" in " | ".join(_flash_bwd_sm90.supports(normalize(q, k, k, mask=np.ones((100, 80), bool))))
    specs = _flash_bwd_sm90.kernel_specs()
    assert all(s.hopper_only for s in specs) and len(specs) == 2 * len(_flash_bwd_sm90.HEAD_DIMS)


def test_compiles_clean_cpu():
    try:
        from cupy.cuda import nvrtc  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"NVRTC unavailable: {exc}")
    from cupyattn._kernels import compile_offline
    for d in _flash_bwd_sm90.HEAD_DIMS:
        rep = compile_offline(_flash_bwd_sm90.spec_for(BFLOAT16, d), "sm_90a")
        assert rep.ok and not rep.spills and not rep.stack_frame, rep.line() + rep.log[-2000:]
        assert "C7508" not in rep.log and "serializ" not in rep.log, rep.log
