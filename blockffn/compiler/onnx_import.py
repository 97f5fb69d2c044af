"""Compile an ONNX BlockFFN graph with our passes: import with ``tvm.relax.frontend.onnx``, find the BlockFFN layers
by structure (`OutlineBlockFFN`), lower them to the union-sparse kernels (`LowerBlockFFNSparse`) and build.

This is the path for a model that reaches us as ONNX (exported elsewhere, e.g. by `blockffn export-onnx`): the
graph keeps its own I/O (``main(input_ids, attention_mask, position_ids, past…) -> (logits, present…)``), and every
BlockFFN layer the pass recognises runs over the union of the experts its tokens activate, a union per
``union_chunk`` consecutive tokens (prefill) or over the one token of a decode step.  Weights are embedded
constants of the library, as the importer leaves them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from blockffn.errors import BlockFFNError

ENTRY = "main"  # the one Relax function the ONNX importer produces


@dataclass
class OnnxBuild:
    executable: object  # tvm.relax.VMExecutable
    layers_outlined: int  # BlockFFN layers recognised in the graph
    layers_sparse: int  # calls redirected to a union-sparse twin
    functions: list[str]  # Relax functions after the graph passes (the ``BlockFFN*_sparse*`` twins among them)
    unmatched: list[str] = field(default_factory=list)  # router-like matmuls not recognised, with the reason
    input_names: list[str] = field(default_factory=list)


def import_onnx(path: str | Path):
    """(Relax IRModule, graph input names) of an ONNX file (external data beside it is read too)."""
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    path = Path(path)
    if not path.is_file():
        raise BlockFFNError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf raises its own DecodeError; onnx raises ValueError / OSError
        raise BlockFFNError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    _tie_total_length(model.graph)
    names = [i.name for i in model.graph.input]
    with warnings.catch_warnings():  # it renames every dotted input (past_key_values.0.key -> past_key_values_0_key)
        warnings.filterwarnings("ignore", message="Renaming name")
        return from_onnx(model, keep_params_in_input=False), names


def _tie_total_length(graph) -> None:
    """State GenAI's contract in the graph: ``total_sequence_length`` = past + new tokens.

    The attention mask's key axis and the attention scores' (past keys + new keys) must be one symbolic length for
    the importer to know their shapes; left as independent names, every score after the mask has unknown shape
    and cannot be compiled."""
    inputs = {i.name: i for i in graph.input}
    if "attention_mask" not in inputs or "input_ids" not in inputs:
        return
    seq = inputs["input_ids"].type.tensor_type.shape.dim[1].dim_param
    past = next((i.type.tensor_type.shape.dim[2].dim_param for i in graph.input
                 if i.name.startswith("past_key_values.")), None)
    total = inputs["attention_mask"].type.tensor_type.shape.dim[1]
    if not seq or not total.dim_param or (past is not None and not past):
        return
    total.dim_param = seq if past is None else f"{past}+{seq}"


def build_onnx(path: str | Path, target: str = "cpu", ffn: str = "sparse", union_chunk: int = 16) -> OnnxBuild:
    """Compile an ONNX model for a target preset; ``ffn="sparse"`` outlines and sparse-lowers its BlockFFN
    layers (and refuses a graph where none is found), ``"dense"`` builds the graph as imported."""
    import tvm
    from tvm import relax

    from blockffn.compiler.pipeline import build_pipeline
    from blockffn.relax_passes.lower_sparse_ffn import LowerBlockFFNSparse
    from blockffn.relax_passes.outline_blockffn import OutlineBlockFFN
    from blockffn.schedules.dlight_rules import reduction_rules_guarded, schedule_passes
    from blockffn.targets import get_target

    if ffn not in ("sparse", "dense"):
        raise BlockFFNError(f"unknown ffn {ffn!r}; use sparse or dense")
    preset = get_target(target)
    tvm_target = preset.tvm_target()
    mod, names = import_onnx(path)
    outline = OutlineBlockFFN()
    lower = LowerBlockFFNSparse({ENTRY: union_chunk}, family=preset.kernel_family)
    if ffn == "sparse":
        mod = outline(mod)
        if not outline.matched.get(ENTRY):
            raise BlockFFNError(f"{path}: no BlockFFN layer recognised in the graph "
                                f"({'; '.join(outline.unmatched.get(ENTRY, [])) or 'no gated expert matmul'})")
        mod = lower(mod)
    functions = sorted(gv.name_hint for gv, f in mod.functions.items() if isinstance(f, relax.Function))
    pipeline, _ = build_pipeline(tvm_target, {"source": str(path)}, {}, schedule_passes=schedule_passes(tvm_target))
    with tvm_target, reduction_rules_guarded():
        lowered = pipeline(mod)
    executable = relax.build(lowered, tvm_target, relax_pipeline=tvm.transform.Sequential([]),
                             system_lib=preset.system_lib)
    return OnnxBuild(executable, outline.matched.get(ENTRY, 0), lower.rewritten.get(ENTRY, 0), functions,
                     outline.unmatched.get(ENTRY, []), names)
