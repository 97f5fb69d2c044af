"""Run the OpenCL kernels TVM generates on any OpenCL device through pyopencl (PoCL on CI's CPU).

The x86 apache-tvm wheel has no OpenCL runtime, so nothing here goes through TVM's device API.  Instead:
  * `kernel_programs(source)` splits the OpenCL C that TVM embeds into its per-kernel programs (TVM's OpenCL
    runtime builds one program per kernel; each carries the prototypes of all kernels);
  * `PoCLInterpreter` walks a *scheduled* Relax function (after legalize + dlight, before VM lowering) binding by
    binding: every ``call_tir`` PrimFunc is lowered with TVM's own TIR pipeline for the OpenCL target, its device
    kernels are compiled by the OpenCL driver and launched with the grid/block extents of their
    ``thread_extent`` attributes, evaluated for the call's shapes.
Nothing depends on which kernels a schedule produces, so the kernels are tested as the compiler emits them.
"""

from __future__ import annotations

import re

import numpy as np
import tvm
from tvm import relax, tirx

FUNCTION_MARK = "// Function: "


def kernel_programs(source: str) -> dict[str, str]:
    """{kernel name: OpenCL C program} from a TVM OpenCL module's ``inspect_source()``."""
    parts = source.split(FUNCTION_MARK)[1:]
    return {p.split("\n", 1)[0].strip(): FUNCTION_MARK + p for p in parts}


def opencl_sources(module) -> list[str]:
    """OpenCL C of every OpenCL module imported anywhere below a runtime module."""
    out, stack = [], [module]
    while stack:
        m = stack.pop()
        if m.kind == "opencl":
            out.append(m.inspect_source())
        stack.extend(m.imports)
    return out


def _kernel_layout(func: tirx.PrimFunc) -> tuple[dict, dict]:
    """A device kernel's ``thread_extent`` attributes ({"blockIdx.x": extent}, first one per tag) and the buffers it
    declares over its pointer parameters ({"name_ptr": Buffer}; shapes of workspaces the host would allocate)."""
    extents, buffers, stack = {}, {}, [func.body]
    while stack:
        node = stack.pop()
        if isinstance(node, tirx.AttrStmt) and node.attr_key == "thread_extent":
            extents.setdefault(node.node.thread_tag, node.value)
        if isinstance(node, tirx.DeclBuffer) and isinstance(node.data, tvm.ir.Var):
            buffers.setdefault(node.data.name, []).append(node.buffer)
        if isinstance(node, tirx.SeqStmt):
            stack.extend(node.seq)
        for child in ("body", "then_case", "else_case"):
            value = getattr(node, child, None)
            if isinstance(value, tirx.Stmt):
                stack.append(value)
    return extents, buffers


def _evaluate(expr, shapes) -> int:
    """A shape expression (e.g. the chunk count ``(n + 3) // 4``) for the bound shape variables."""
    if isinstance(expr, tirx.IntImm):
        return int(expr)
    if isinstance(expr, tirx.Var):
        return shapes[expr]
    ops = {tirx.Add: lambda a, b: a + b, tirx.Sub: lambda a, b: a - b, tirx.Mul: lambda a, b: a * b,
           tirx.FloorDiv: lambda a, b: a // b, tirx.FloorMod: lambda a, b: a % b}
    for kind, fn in ops.items():
        if isinstance(expr, kind):
            return fn(_evaluate(expr.a, shapes), _evaluate(expr.b, shapes))
    raise NotImplementedError(f"shape expression {expr}")


class _LoweredPrimFunc:
    """Device kernels (in launch order) of one PrimFunc lowered for OpenCL, with their OpenCL programs."""

    def __init__(self, name: str, func: tirx.PrimFunc, target: tvm.target.Target):
        from tvm.tirx.build import split_host_device_mods

        self.params = list(func.params)
        mod = tvm.IRModule({name: func.with_attr("global_symbol", name)})
        mod = tirx.transform.BindTarget(target.with_host(target.host))(mod)
        # the pipeline relax.build (so blockffn-compile) lowers TIR with, for every target
        pipeline, _, finalize_device = tirx.get_tir_pipeline("default")
        # no common-subexpression elimination: kernel scalars stay the function's own shape variables
        with tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
            mod = pipeline(mod)
            _, device = split_host_device_mods(mod)
            (device_mod,) = [finalize_device()(m) for m in device.values()]
        programs = kernel_programs(tvm.get_global_func("target.build.opencl")(device_mod, target).inspect_source())

        def order(item):
            tail = item[0].name_hint.rsplit("_kernel", 1)[1]
            return int(tail.lstrip("_") or 0)

        self.kernels = [(gv.name_hint, f, programs[gv.name_hint])
                        for gv, f in sorted(device_mod.functions.items(), key=order)]


class PoCLInterpreter:
    """Evaluate Relax functions of a scheduled module with every PrimFunc running on an OpenCL device."""

    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target, context, queue):
        self.mod, self.target, self.ctx, self.queue = mod, target, context, queue
        self._lowered: dict[str, _LoweredPrimFunc] = {}
        self._kernels: dict[str, object] = {}
        self.launched: list[str] = []

    # ------------------------------------------------------------------------------------------ Relax level
    def __call__(self, func_name: str, *args):
        func = self.mod[func_name]
        env: dict = {}
        shapes: dict = {}
        for param, value in zip(func.params, args):
            env[param] = value
            self._bind_shape(param.ty, value, shapes)
        return self._eval(func.body, env, shapes)

    def _bind_shape(self, ty, value, shapes):
        if isinstance(ty, relax.TupleType):
            for t, v in zip(ty.fields, value):
                self._bind_shape(t, v, shapes)
        elif isinstance(ty, relax.TensorType) and ty.shape is not None:
            for dim, n in zip(ty.shape.values, value.shape):
                if isinstance(dim, tirx.Var):
                    shapes[dim] = int(n)

    def _eval(self, expr, env, shapes):
        if isinstance(expr, relax.SeqExpr):
            for block in expr.blocks:
                for binding in block.bindings:
                    if isinstance(binding, relax.MatchCast):
                        raise NotImplementedError("match_cast in a scheduled function")
                    env[binding.var] = self._eval(binding.value, env, shapes)
            return self._eval(expr.body, env, shapes)
        if isinstance(expr, relax.Var):
            return env[expr]
        if isinstance(expr, tvm.ir.expr.Constant):
            return expr.value.numpy()
        if isinstance(expr, relax.TupleGetItem):
            return self._eval(expr.tuple_value, env, shapes)[expr.index]
        if isinstance(expr, relax.Tuple):
            return tuple(self._eval(f, env, shapes) for f in expr.fields)
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.GlobalVar):
            return self(expr.op.name_hint, *(self._eval(a, env, shapes) for a in expr.args))
        if isinstance(expr, relax.Call) and expr.op.name == "relax.call_tir":
            gv, inputs = expr.args[0], [self._eval(a, env, shapes) for a in expr.args[1].fields]
            out_tys = expr.ty.fields if isinstance(expr.ty, relax.TupleType) else [expr.ty]
            outputs = [self._empty(t, shapes) for t in out_tys]
            self.run_primfunc(gv.name_hint, inputs, outputs)
            return tuple(outputs) if isinstance(expr.ty, relax.TupleType) else outputs[0]
        raise NotImplementedError(f"cannot interpret {type(expr).__name__}: {expr}")

    @staticmethod
    def _empty(ty, shapes):
        dims = [shapes[d] if isinstance(d, tirx.Var) else _evaluate(d, shapes) for d in ty.shape.values]
        # unwritten float outputs stay NaN, so a kernel that reads what it never wrote shows up in the result
        dtype = str(ty.dtype)
        return np.full(dims, np.nan if dtype.startswith("float") else 0, dtype=dtype)

    # ------------------------------------------------------------------------------------------ TIR level
    def run_primfunc(self, name: str, inputs: list[np.ndarray], outputs: list[np.ndarray]) -> None:
        """Launch every device kernel of PrimFunc ``name`` (parameters: inputs, then outputs); fills ``outputs``."""
        import pyopencl as cl

        if name not in self._lowered:
            self._lowered[name] = _LoweredPrimFunc(name, self.mod[name], self.target)
        lowered = self._lowered[name]
        device, scalars = {}, {}  # kernel parameter name -> cl.Buffer / shape variable value
        for param, array in zip(lowered.params, inputs + outputs):
            # TVM's OpenCL codegen names the pointer of buffer `b` `b_ptr`
            device[f"{param.name}_ptr"] = cl.Buffer(self.ctx, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR,
                                                    hostbuf=np.ascontiguousarray(array)) if array.size else None
            for dim, n in zip(param.ty.shape, array.shape):
                if isinstance(dim, tirx.Var):
                    scalars[dim.name] = int(n)
        workspaces = {}  # global scratch buffers the host allocates for the kernels of this PrimFunc
        for kernel_name, func, program in lowered.kernels:
            analyzer = tvm.sym.Analyzer()
            for p in func.params:
                if p.name in scalars:
                    analyzer.bind(p, tvm.tirx.const(scalars[p.name], str(p.ty)))
            extents, declared = _kernel_layout(func)
            args = []
            for p in func.params:
                if p.name in device:
                    args.append(device[p.name])
                elif p.name in scalars:
                    args.append(np.dtype(str(p.ty)).type(scalars[p.name]))
                elif p.name in declared:
                    nbytes = max(int(analyzer.simplify(_numel(b))) * np.dtype(str(b.dtype)).itemsize
                                 for b in declared[p.name])
                    if workspaces.get(p.name) is None or workspaces[p.name].size < nbytes:
                        workspaces[p.name] = cl.Buffer(self.ctx, cl.mem_flags.READ_WRITE, max(nbytes, 4))
                    args.append(workspaces[p.name])
                else:
                    raise KeyError(f"{kernel_name}: no value for kernel parameter {p.name}")
            extents = {tag: int(analyzer.simplify(e)) for tag, e in extents.items()}
            block = [extents.get(f"threadIdx.{a}", 1) for a in "xyz"]
            grid = [extents.get(f"blockIdx.{a}", 1) for a in "xyz"]
            kernel = self._kernel(kernel_name, program)
            kernel(self.queue, tuple(g * b for g, b in zip(grid, block)), tuple(block), *args)
            self.launched.append(kernel_name)
        for param, array in zip(lowered.params[len(inputs):], outputs):
            if array.size:
                cl.enqueue_copy(self.queue, array, device[f"{param.name}_ptr"])
        self.queue.finish()

    def _kernel(self, name: str, program: str):
        import pyopencl as cl

        # keyed by the program too: kernels of different PrimFuncs may share a name
        if (name, program) not in self._kernels:
            self._kernels[(name, program)] = cl.Kernel(cl.Program(self.ctx, program).build(), name)
        return self._kernels[(name, program)]


def _numel(buffer):
    n = tvm.tirx.const(1, "int64")
    for dim in buffer.shape:
        n = n * tvm.tirx.Cast("int64", dim)
    return n


def kernel_names(source: str) -> list[str]:
    return re.findall(r"__kernel void (\w+)\(", source)
