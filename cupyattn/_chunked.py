"""The chunked (memory-efficient) backend: query chunks over all keys in a bounded workspace."""
from ._registry import Backend


class ChunkedBackend(Backend):
    name = "chunked"

    def forward_reasons(self, problem):
        return ["not built yet (chunked backend, issue 4)"]

    def backward_reasons(self, problem):
        return ["not built yet (chunked backend, issue 4)"]
