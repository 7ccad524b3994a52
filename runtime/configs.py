"""Choosing each kernel's launch config at run time: explicit overrides, then the lookup chain of
DESIGN.md (measured -> nearest shape -> shipped -> predicted -> template default), answered from
memory after the first call."""

from __future__ import annotations

import inspect

from codegen.template import get_template


class CompiledOpResolver:
    """Adapts autotune's ConfigResolver to the kernels of one CompiledOp."""

    def __init__(self, compiled):
        from autotune.lookup import ConfigResolver

        self.overrides = compiled.overrides
        self.chain = ConfigResolver(compiled.db)
        self.op_name = compiled.op.name
        try:
            self.op_file = inspect.getsourcefile(compiled.op.fn)
        except TypeError:
            self.op_file = None

    def resolve(self, kernel, problem: dict, env: dict | None = None):
        override = self.overrides.get(kernel.name) or self.overrides.get(kernel.template)
        if override is None and not all(problem.values()):
            # An empty problem launches nothing: there is no config to tune or look up.
            return dict(get_template(kernel.template).space.default), "default", "empty problem, nothing to launch"
        return tuple(self.chain.resolve(kernel.template, kernel.source_hash, problem,
                                        token_dim=get_template(kernel.template).token_dim,
                                        op_file=self.op_file, op_name=self.op_name, override=override,
                                        op_shape=env))


def resolver_for(compiled) -> CompiledOpResolver:
    return CompiledOpResolver(compiled)
