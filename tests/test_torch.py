"""cupyattn.torch: autograd through DLPack, on CPU tensors (NumPy path) and CUDA tensors."""
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (optional extra 'torch')")
import cupyattn.torch as cat  # noqa: E402
from conftest import GPU_MISSING  # noqa: E402
from strategies import BFLOAT16, tolerance  # noqa: E402


def tensors(device, dtype, *shapes, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
            for s in shapes]


SHAPES = ((1, 4, 5, 3), (1, 2, 6, 3), (1, 2, 6, 2))


@pytest.mark.parametrize("backend", ["eager", "chunked"])
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64_cpu(backend, causal):
    q, k, v = tensors("cpu", torch.float64, *SHAPES)
    mask = torch.rand(5, 6, generator=torch.Generator().manual_seed(1)) < 0.8
    fn = lambda q, k, v: cat.attention(q, k, v, causal=causal, mask=mask, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_returns_lse_and_rejects_other_types():
    q, k, v = tensors("cpu", torch.float32, *SHAPES)
    out, lse = cat.attention(q, k, v, return_lse=True)
    assert out.shape == (1, 4, 5, 2) and lse.shape == (1, 4, 5) and not lse.requires_grad
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        cat.attention(q, k.detach().numpy(), v)


@pytest.mark.gpu
@pytest.mark.skipif(GPU_MISSING is None and not torch.cuda.is_available(), reason="torch has no CUDA here")
@pytest.mark.parametrize("backend", ["auto", "eager", "chunked"])
def test_gradients_against_torch_sdpa_bfloat16(backend):
    import torch.nn.functional as F
    shapes = ((2, 4, 200, 64), (2, 4, 200, 64), (2, 4, 200, 64))
    q, k, v = tensors("cuda", torch.bfloat16, *shapes, seed=3)
    dout = torch.randn(2, 4, 200, 64, device="cuda", dtype=torch.bfloat16)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*ref, is_causal=True).backward(dout.double())
    sdpa = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*sdpa, is_causal=True).backward(dout)
    ours = cat.attention(q, k, v, causal=True, backend=backend)
    ours.backward(dout)
    for name, mine, theirs, exact in zip("qkv", (q, k, v), sdpa, ref):
        err = (mine.grad.double() - exact.grad).norm() / exact.grad.norm()
        err_sdpa = (theirs.grad.double() - exact.grad).norm() / exact.grad.norm()
        assert err <= 3 * err_sdpa + tolerance(BFLOAT16), (name, float(err), float(err_sdpa))
