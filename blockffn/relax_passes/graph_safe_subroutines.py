"""InlineSubroutines: put every private Relax subroutine into its callers, for CUDA-graph builds.

``RewriteCUDAGraph`` (`relax.backend.use_cuda_graph`) captures stretches of kernels over *static* tensors and replays
each stretch from a cache keyed by its position in the executable, never by the tensors passed in.  Two things break
that for a model whose layers call private subroutines (``BlockFFN*``, one call per layer):

* inside a private function every parameter counts as static (it has no ``num_input``), so the capture made on the
  layer-0 call is replayed, with layer 0's weights and input, for every other layer;
* a caller's captured stretch reads the subroutine's result from wherever the subroutine allocated it on the
  capturing call.

Inlined, a layer's FFN is planned and captured with the rest of the step.  ``relax.transform.InlinePrivateFunctions``
alone loses the shapes of calls with symbolic shapes (prefill, batched calls: the callee's ``seq_len`` is not the
caller's), so each call site inlines a fresh copy of its callee whose shape variables are bound to the caller's.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator


def _private(func) -> bool:
    return isinstance(func, relax.Function) and (func.attrs is None or "global_symbol" not in func.attrs)


def _symbolic_binding(callee: relax.Function, args) -> dict:
    """Callee shape variable -> the caller's expression, matched through the parameters' tensor shapes."""
    binding = {}
    for param, arg in zip(callee.params, args):
        p_shape, a_shape = getattr(param.ty, "shape", None), getattr(arg.ty, "shape", None)
        if isinstance(p_shape, relax.ShapeExpr) and isinstance(a_shape, relax.ShapeExpr):
            for pv, av in zip(p_shape.values, a_shape.values):
                if isinstance(pv, tvm.tirx.Var) and pv not in binding:
                    binding[pv] = av
    return binding


@mutator
class _Inline(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod_ = mod

    def visit_var_binding_(self, binding):  # noqa: N802 - TVM visitor naming
        value = binding.value
        if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.GlobalVar)
                and value.op in self.mod_.functions and _private(self.mod_[value.op])):
            super().visit_var_binding_(binding)
            return
        args = [self._as_var(self.visit_expr(a)) for a in value.args]
        callee = relax.utils.copy_with_new_vars(self.mod_[value.op])  # fresh variables for this call site
        shapes = _symbolic_binding(callee, args)
        if shapes:
            callee = callee.bind_symbolic_vars(shapes)
        for param, arg in zip(callee.params, args):
            self.set_var_remap(param, arg)
        for block in callee.body.blocks:
            for b in block.bindings:
                self.visit_binding(b)
        self.set_var_remap(binding.var, self._as_var(self.visit_expr(callee.body.body)))

    def _as_var(self, expr):
        return expr if isinstance(expr, relax.Var) else self.builder_.emit(expr)


@tvm.transform.module_pass(opt_level=0, name="InlineSubroutines")
def InlineSubroutines(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 - TVM pass naming
    inline = _Inline(mod)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function) and not _private(func):
            inline.builder_.update_func(gv, inline.visit_expr(func))
    return relax.transform.DeadCodeElimination()(inline.builder_.get())
