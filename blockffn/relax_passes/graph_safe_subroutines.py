"""Make private Relax subroutines safe for TVM's CUDA-graph rewriting (`relax.backend.use_cuda_graph`).

``RewriteCUDAGraph`` captures stretches of kernels over *static* tensors and replays each stretch from a cache keyed
by its position in the executable, never by the tensors passed in.  Two things break that for a model whose layers
call private subroutines (``BlockFFN*``, one call per layer):

* inside a private function every parameter counts as static (it has no ``num_input``), so the capture made on the
  layer-0 call is replayed, with layer 0's weights and input, for every other layer;
* a caller's captured stretch reads the subroutine's result from wherever the subroutine allocated it on the
  capturing call.

``InlineStaticSubroutines`` puts the body of every call with static argument shapes (decode, decode-shaped
verification) into its caller, where it is planned and captured with the rest of the step.  Calls with symbolic
shapes (prefill, batched calls) keep their subroutine, which is marked ``num_input = len(params)`` so that nothing
reading its parameters is captured; stretches with symbolic shapes are not captured by TVM in the first place.
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


def _static(expr) -> bool:
    shape = getattr(expr.ty, "shape", None)
    return isinstance(shape, relax.ShapeExpr) and all(isinstance(v, tvm.tirx.IntImm) for v in shape.values)


@mutator
class _InlineStatic(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, symbolic: bool):
        super().__init__(mod)
        self.mod_ = mod
        self.symbolic = symbolic
        self.inlined = 0

    def visit_var_binding_(self, binding):  # noqa: N802 - TVM visitor naming
        value = binding.value
        if (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.GlobalVar)
                and value.op in self.mod_.functions and _private(self.mod_[value.op])
                and (self.symbolic or all(_static(a) for a in value.args if isinstance(a.ty, relax.TensorType)))):
            callee = relax.utils.copy_with_new_vars(self.mod_[value.op])
            binding_map = _symbolic_binding(callee, [self.visit_expr(a) for a in value.args])
            if binding_map:  # the callee's shape variables become the caller's shapes
                callee = callee.bind_symbolic_vars(binding_map)
            for param, arg in zip(callee.params, value.args):
                self.set_var_remap(param, self._as_var(self.visit_expr(arg)))
            body = callee.body
            for block in body.blocks:
                for b in block.bindings:
                    self.visit_binding(b)
            self.set_var_remap(binding.var, self._as_var(self.visit_expr(body.body)))
            self.inlined += 1
            return
        super().visit_var_binding_(binding)


    def _as_var(self, expr):
        return expr if isinstance(expr, relax.Var) else self.builder_.emit(expr)


SYMBOLIC = True


@tvm.transform.module_pass(opt_level=0, name="InlineStaticSubroutines")
def InlineStaticSubroutines(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 - TVM pass naming
    callers = [gv for gv, f in mod.functions.items() if isinstance(f, relax.Function) and not _private(f)]
    inline = _InlineStatic(mod, SYMBOLIC)
    for gv in callers:
        inline.builder_.update_func(gv, inline.visit_expr(mod[gv]))
    mod = relax.transform.DeadCodeElimination()(inline.builder_.get())
    for gv, func in list(mod.functions.items()):
        if _private(func):
            mod[gv] = func.with_attr("num_input", len(func.params))
    return mod
