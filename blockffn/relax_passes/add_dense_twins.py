"""AddDenseTwins: export ``<name>_dense`` copies of the functions the sparse lowering will rewrite.

Runs before LowerBlockFFNSparse, which only rewrites the functions it is given by name, so the copies keep the
dense BlockFFN body.  One library then carries both lowerings of the same weights: the runtime can fall back to
dense (``Engine(ffn="dense")``) and `blockffn bench` can compare dense and sparse decoding without a second build.
"""

from __future__ import annotations

DENSE_SUFFIX = "_dense"


def AddDenseTwins(functions, suffix: str = DENSE_SUFFIX):  # noqa: N802 - TVM pass naming
    import tvm  # here, so the suffix can be imported without loading TVM (CLI start-up)
    from tvm import relax

    names = list(functions)

    @tvm.transform.module_pass(opt_level=0, name="AddDenseTwins")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        present = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, relax.Function)}
        for name in names:
            if name not in present or name + suffix in present:
                continue
            twin = relax.utils.copy_with_new_vars(present[name]).with_attr("global_symbol", name + suffix)
            mod[tvm.ir.GlobalVar(name + suffix)] = twin
        return mod

    return _pass
