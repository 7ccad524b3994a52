"""One error hierarchy for all of kdsl.

Every error a user can cause derives from :class:`KdslError`, so callers (the CLI, the HTTP
server) can turn them into one-line messages instead of tracebacks.
"""

from __future__ import annotations


class KdslError(Exception):
    """Base class of every error kdsl raises on purpose."""


class DSLError(KdslError):
    """Something is wrong in a user's op: names the op, the node and the user's source line."""

    def __init__(self, message: str, *, op: str | None = None, node: str | None = None,
                 line: str | None = None):
        self.op, self.node, self.line, self.reason = op, node, line, message
        where = []
        if op:
            where.append(f"op '{op}'")
        if node:
            where.append(f"node {node}")
        if line:
            where.append(f"at {line}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class CodegenError(KdslError):
    """A kernel could not be rendered or validated."""


class TuningError(KdslError):
    """Autotuning failed in a way the user must act on."""


class DatabaseError(KdslError):
    """The tuning database is unreachable, corrupt, foreign, or an import was rejected."""


class ServingError(KdslError):
    """A serving request or configuration is invalid."""


class TrainingError(KdslError):
    """A training configuration or checkpoint is invalid."""
