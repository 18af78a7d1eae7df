"""The backend registry: what each backend supports, which one runs, and why not the others.

A backend answers, for a given Problem, the list of reasons it cannot run it (empty = it can).
`backend="auto"` takes the first backend, in registry order, whose list is empty. Reasons that
only matter to automatic choice ("eager is faster at this size") are kept apart from hard limits
so that forcing a backend still works where it is merely not preferred.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from ._problem import Problem


class Backend:
    """Base class. Subclasses set `name` and override what they support."""
    name = "?"

    def forward_reasons(self, problem: Problem) -> List[str]:
        """Why this backend cannot compute the forward of `problem` (empty list = it can)."""
        return []

    def backward_reasons(self, problem: Problem) -> List[str]:
        """Why this backend cannot compute the gradients of `problem`."""
        return []

    def auto_reasons(self, problem: Problem, direction: str) -> List[str]:
        """Why `backend="auto"` should pass over this backend although it could run."""
        return []

    def notes(self, problem: Problem) -> List[str]:
        """What running it would cost beyond the obvious (copies, workspace), for `explain`."""
        return []

    def forward(self, problem: Problem, want_lse: bool):
        """Return (out, lse) in internal shapes: batch_shape + (Hq, Lq, Dv) and + (Hq, Lq)."""
        raise NotImplementedError

    def backward(self, problem: Problem, dout, out, lse, deterministic: bool = False):
        """Return (dq, dk, dv) shaped like the broadcast views problem.q, problem.k, problem.v,
        in the accumulation dtype; the caller sums broadcast axes and casts. deterministic=True
        asks for the same bits on every run (backends whose sums have a fixed order ignore it)."""
        raise NotImplementedError


class BackendUnavailable(ValueError):
    """A forced backend cannot run these inputs; the message lists why."""


_REGISTRY: List[Backend] = []


def register(backend: Backend) -> Backend:
    _REGISTRY.append(backend)
    return backend


def backends() -> List[Backend]:
    return list(_REGISTRY)


def backend_names() -> List[str]:
    return [b.name for b in _REGISTRY]


def get(name: str) -> Backend:
    for b in _REGISTRY:
        if b.name == name:
            return b
    raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {backend_names()}")


def reasons(backend: Backend, problem: Problem, direction: str) -> List[str]:
    if direction == "forward":
        return backend.forward_reasons(problem)
    if direction == "backward":
        return backend.backward_reasons(problem)
    raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")


class Explanation:
    """Which backend runs a problem and why not the others. `str()` gives one line per backend."""

    def __init__(self, chosen: Optional[str], requested: str, direction: str,
                 why_not: Dict[str, List[str]], notes: Dict[str, List[str]], problem: Problem):
        self.backend = chosen            # the backend that runs, or None if none can
        self.requested = requested
        self.direction = direction
        self.why_not = why_not           # backend name -> reasons it does not run (empty for the chosen one)
        self.notes = notes               # backend name -> costs worth knowing (copies, workspace)
        self.problem = problem.describe()

    def __str__(self):
        width = max(len(n) for n in self.why_not)
        lines = [f"{self.direction} of {self.problem} (backend={self.requested!r})"]
        for name, why in self.why_not.items():
            if name == self.backend:
                status = "runs"
                extra = self.notes.get(name)
                if extra:
                    status += " (" + "; ".join(extra) + ")"
            elif why:
                status = "no: " + "; ".join(why)
            else:
                status = "could run, not chosen"
            lines.append(f"  {name:<{width}}  {status}")
        return "\n".join(lines)

    __repr__ = __str__


def explain(problem: Problem, requested: str = "auto", direction: str = "forward") -> Explanation:
    why_not: Dict[str, List[str]] = {}
    chosen = None
    if requested != "auto":
        get(requested)   # raises on an unknown name
    for b in _REGISTRY:
        hard = reasons(b, problem, direction)
        if requested == "auto":
            soft = [] if hard else b.auto_reasons(problem, direction)
            why = hard + soft
            if not why and chosen is None:
                chosen = b.name
        else:
            why = hard if b.name == requested else ["not requested"]
            if b.name == requested and not hard:
                chosen = b.name
        why_not[b.name] = why
    notes = {b.name: b.notes(problem) for b in _REGISTRY if b.name == chosen}
    return Explanation(chosen, requested, direction, why_not, notes, problem)


def select(problem: Problem, requested: str, direction: str) -> Backend:
    """The backend to run, or BackendUnavailable with every reason. Asks only as many backends
    as it takes (this runs on every call); the full report is built only for the error."""
    if requested == "auto":
        for b in _REGISTRY:
            if not reasons(b, problem, direction) and not b.auto_reasons(problem, direction):
                return b
    else:
        b = get(requested)
        if not reasons(b, problem, direction):
            return b
    report = explain(problem, requested, direction)
    if requested == "auto":
        raise BackendUnavailable(f"no backend can run this {direction}:\n{report}")
    raise BackendUnavailable(
        f"backend {requested!r} cannot run this {direction}: "
        + "; ".join(report.why_not[requested]) + f" ({report.problem})")
