"""Assertions shared by the tests of every backend."""
import cupyattn
from reference import rel_error
from strategies import tolerance


def run_error(backend, inputs, case, ref_out, **extra):
    """Norm-relative error of `backend` on `inputs` against the float64 reference output."""
    out = cupyattn.attention(inputs["q"], inputs["k"], inputs["v"], backend=backend,
                             **case.kwargs(inputs), **extra)
    return rel_error(out, ref_out)


def allowed_error(eager_error, dtype, factor=2.0):
    """The tolerance rule: at most ~2x the eager path's error in the same dtype, plus a small floor."""
    return factor * eager_error + tolerance(dtype)
