"""cupyattn: exact scaled-dot-product attention, softmax(Q K^T * scale) V, for CuPy and NumPy arrays.

Public names: attention, attention_backward, explain, backends, BackendUnavailable, bfloat16, and the
chunked backend's workspace budget: workspace (context manager), set_workspace_bytes, get_workspace_bytes.
"""
from ._api import attention, attention_backward, explain
from ._problem import BFLOAT16 as bfloat16
from ._registry import BackendUnavailable, backend_names, register
from ._chunked import ChunkedBackend, get_workspace_bytes, set_workspace_bytes, workspace
from ._eager import EagerBackend
from ._flash import FlashBackend

# Order is preference: backend="auto" runs the first one that can.
register(FlashBackend())
register(ChunkedBackend())
register(EagerBackend())


def backends():
    """Names of the registered backends, in the order backend="auto" tries them."""
    return backend_names()


__all__ = ["attention", "attention_backward", "explain", "backends", "BackendUnavailable", "bfloat16",
           "workspace", "set_workspace_bytes", "get_workspace_bytes"]
__version__ = "0.1.0"
