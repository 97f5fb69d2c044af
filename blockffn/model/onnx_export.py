"""Export the PyTorch reference model to ONNX, with the KV-cache inputs and outputs ONNX Runtime GenAI and Optimum use.

Graph I/O (the names and dims ``optimum`` and ``onnxruntime-genai`` give a decoder with past)::

    input_ids              int64 [batch_size, sequence_length]
    attention_mask         int64 [batch_size, total_sequence_length]   1 = attend (left padding allowed)
    position_ids           int64 [batch_size, sequence_length]
    past_key_values.{i}.key / .value   [batch_size, kv_heads, past_sequence_length, key_dim / value_dim]
    -> logits              float [batch_size, sequence_length, vocab_size]
    -> present.{i}.key / .value        [batch_size, kv_heads, total_sequence_length, key_dim / value_dim]

Without ``with_past`` the graph has the three token inputs and ``logits`` only (full-sequence scoring).  The FFN is
the dense reference (`BlockFFN.forward`: every expert times its exact-zero gate): ONNX has no activation-sparse
operator, so sparsity is something a consumer recovers from the structure (`blockffn.relax_passes.outline_blockffn`).

The exporter is ``torch.onnx.export(dynamo=True)`` (the torch.export path): the legacy TorchScript exporter emits
``Expand`` nodes with shape tensors that TVM's ONNX importer cannot convert.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from blockffn.errors import BlockFFNError
from blockffn.model.config import BlockFFNConfig
from blockffn.model.modeling import BlockFFNForCausalLM, KVCache

OPSET = 18  # the newest opset TVM 0.27's importer and ONNX Runtime 1.32 both cover for every op the graph uses
PROTOBUF_LIMIT = 2 << 30  # a single .onnx protobuf cannot exceed 2 GiB: larger models keep weights outside
DIM_NAMES = ("batch_size", "sequence_length", "past_sequence_length", "total_sequence_length")


def cache_dims(cfg: BlockFFNConfig) -> tuple[int, int, int]:
    """(kv heads, key size, value size) of one layer's cache as the PyTorch model stores it."""
    if cfg.attention_type == "mla":  # per-head keys: nope part and the shared rope part, expanded
        return cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    return cfg.num_key_value_heads, cfg.gqa_head_dim, cfg.gqa_head_dim


def io_names(num_layers: int, with_past: bool) -> tuple[list[str], list[str]]:
    inputs, outputs = ["input_ids", "attention_mask", "position_ids"], ["logits"]
    if with_past:
        for i in range(num_layers):
            inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
            outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def padded_causal_mask(attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, Tq, Tk]: a query sees the kept keys at positions up to its own.

    Key positions are the running count of kept keys (``cumsum(attention_mask) - 1``, how HF and GenAI derive
    ``position_ids`` under left padding), so the mask is causal by position, not by index.  Written without
    ``arange`` on purpose: an ONNX ``Range`` has a data-dependent length, and importers (TVM's) then lose the
    broadcast shape of the mask and of every attention score after it."""
    key_pos = attention_mask.cumsum(-1) - 1
    return (key_pos[:, None, None, :] <= position_ids[:, None, :, None]) & attention_mask.bool()[:, None, None, :]


class _CausalLMGraph(nn.Module):
    """The model with graph-friendly I/O: flat past tensors in, logits and flat present tensors out."""

    def __init__(self, model: BlockFFNForCausalLM, with_past: bool):
        super().__init__()
        self.model, self.with_past = model, with_past

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = KVCache(keys=list(past[0::2]), values=list(past[1::2])) if self.with_past else None
        mask = padded_causal_mask(attention_mask, position_ids)
        logits = self.model(input_ids, positions=position_ids, cache=cache, mask=mask).logits
        if not self.with_past:
            return logits
        return (logits, *[t for kv in zip(cache.keys, cache.values) for t in kv])


def _example_inputs(cfg: BlockFFNConfig, with_past: bool, dtype: torch.dtype, past: int = 3, seq: int = 2,
                    batch: int = 2):
    """Example tensors of sizes >= 2 (torch.export specializes dims of size 0 and 1)."""
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    if not with_past:
        return ids, torch.ones(batch, seq, dtype=torch.int64), torch.arange(seq).expand(batch, seq).contiguous()
    heads, kd, vd = cache_dims(cfg)
    kv = [torch.zeros(batch, heads, past, d, dtype=dtype) for _ in range(cfg.num_hidden_layers) for d in (kd, vd)]
    return (ids, mask, pos, *kv)


def _dynamic_shapes(cfg: BlockFFNConfig, with_past: bool):
    dyn = torch.export.Dim.DYNAMIC
    tokens = {0: dyn, 1: dyn}
    shapes = {"input_ids": tokens, "attention_mask": tokens, "position_ids": tokens}
    if with_past:
        shapes["past"] = tuple({0: dyn, 2: dyn} for _ in range(2 * cfg.num_hidden_layers))
    return shapes


def _name_dims(graph, with_past: bool) -> None:
    """torch.export names dims s0, s1, …; give the graph I/O the GenAI/Optimum names (one name per meaning, so the
    past keys and values of every layer share ``past_sequence_length``)."""
    by_name = {v.name: v for v in [*graph.input, *graph.output]}

    def dims(name):
        return by_name[name].type.tensor_type.shape.dim

    rename = {dims("input_ids")[0].dim_param: "batch_size", dims("input_ids")[1].dim_param: "sequence_length",
              dims("attention_mask")[1].dim_param: "total_sequence_length"}
    if with_past:
        rename.update({d[2].dim_param: "past_sequence_length"
                       for name in by_name if name.startswith("past_key_values.") for d in [dims(name)]})
    for value in [*graph.input, *graph.output]:
        for i, d in enumerate(value.type.tensor_type.shape.dim):
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]
            elif d.dim_param and value.name.startswith("present."):
                d.dim_param = "total_sequence_length"  # (past + sequence) as torch.export spells it
            elif d.dim_param and value.name == "logits" and i < 2:
                d.dim_param = DIM_NAMES[i]


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints its progress to stdout and warns about optional packages (torchvision) and its own
    deprecations; none of it is actionable for our graph."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning, UserWarning))
            yield
    finally:
        log.setLevel(level)


def export_onnx(model: BlockFFNForCausalLM, path: str | Path, with_past: bool = False, opset: int = OPSET,
                external_data: bool | None = None) -> Path:
    """Write ``model`` (dense FFN, fp32 or its own dtype) to ``path`` and check it with ``onnx.checker``.

    ``external_data`` (default: only when the weights exceed the 2 GiB protobuf limit) stores the weights in
    ``<path>.data`` beside the graph.  The file appears only once complete and checked."""
    import onnx

    path = Path(path)
    if path.suffix != ".onnx":
        raise BlockFFNError(f"{path}: the output must be a .onnx file")
    cfg = model.config
    model = model.eval()
    dtype = next(model.parameters()).dtype
    if external_data is None:
        external_data = sum(p.numel() * p.element_size() for p in model.parameters()) >= PROTOBUF_LIMIT
    inputs, outputs = io_names(cfg.num_hidden_layers, with_past)
    graph = _CausalLMGraph(model, with_past)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(graph, _example_inputs(cfg, with_past, dtype), dynamo=True, opset_version=opset,
                                        input_names=inputs, output_names=outputs,
                                        dynamic_shapes=_dynamic_shapes(cfg, with_past), verbose=False)
        proto = program.model_proto
        _name_dims(proto.graph, with_past)
        staged = tmp / path.name
        onnx.save_model(proto, staged, save_as_external_data=external_data, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
        onnx.checker.check_model(str(staged), full_check=True)
        for f in sorted(tmp.iterdir(), key=lambda f: f.suffix == ".onnx"):  # the graph last: it names the data
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
