# TEMPORARY (integration shim, removed before commit)
from typing import Protocol, runtime_checkable

try:
    from .solvers import RowScorer
except ImportError:
    @runtime_checkable
    class RowScorer(Protocol):
        def self_influence_blocks(self, loader, progress=None, total=None, ids=None): ...

