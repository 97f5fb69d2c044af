"""Reading a Relax function's dataflow as expressions: what the structural matchers of our passes share."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax


class NoMatch(Exception):
    """Why an expression does not have the structure a matcher looks for."""


class Graph:
    """Variable -> bound value over a function's bindings, and small matchers that look through bindings."""

    def __init__(self, func: relax.Function):
        self.defs = {}
        for block in func.body.blocks:
            for b in block.bindings:
                if isinstance(b, relax.VarBinding):
                    self.defs[b.var] = b.value

    def value(self, expr):
        while isinstance(expr, relax.Var) and expr in self.defs:
            expr = self.defs[expr]
        return expr

    def call(self, expr, *ops: str) -> relax.Call:
        v = self.value(expr)
        if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and v.op.name in ops:
            return v
        raise NoMatch(f"expected {' or '.join(ops)}")

    def is_call(self, expr, *ops: str) -> bool:
        try:
            self.call(expr, *ops)
            return True
        except NoMatch:
            return False

    def skip_casts(self, expr):
        while self.is_call(expr, "relax.astype"):
            expr = self.call(expr, "relax.astype").args[0]
        return expr

    def const(self, expr) -> np.ndarray:
        """A constant, looking through casts and permute_dims (returned with the permutation applied)."""
        expr = self.skip_casts(expr)
        v = self.value(expr)
        if isinstance(v, tvm.ir.expr.Constant):
            return v.value.numpy()
        if self.is_call(v, "relax.permute_dims"):
            axes = v.attrs.axes
            arr = self.const(v.args[0])
            return np.transpose(arr, None if axes is None else [int(a) for a in axes])
        raise NoMatch("expected a constant weight")

    def scalar(self, expr) -> float:
        arr = self.const(expr)
        if arr.size != 1:
            raise NoMatch("expected a scalar constant")
        return float(arr.reshape(()))

    def operands(self, call: relax.Call):
        """Both operand orders of a commutative binary call."""
        return [(call.args[0], call.args[1]), (call.args[1], call.args[0])]

    def same(self, a, b) -> bool:
        return self.skip_casts(a).same_as(self.skip_casts(b)) or self.value(a).same_as(self.value(b))
