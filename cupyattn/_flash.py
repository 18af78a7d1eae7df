"""The flash backend: tiled CUDA kernels with online softmax on tensor cores (kernels_cu/flash_fwd.cu)."""
from ._registry import Backend


class FlashBackend(Backend):
    name = "flash"

    def forward_reasons(self, problem):
        return ["not built yet (flash forward kernel, issue 3)"]

    def backward_reasons(self, problem):
        return ["not built yet (flash backward kernels, issue 5)"]
