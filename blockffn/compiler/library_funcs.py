"""Functions every MLC-LLM model library carries besides the model itself (research/mlc.md §2.1).

The runtime's logit processor ICHECKs for the three in-place TIR functions; ``softmax_with_temperature`` turns
logits into probabilities (temperature 0 = argmax as a one-hot limit); ``alloc_embedding_tensor`` tells the
runtime the hidden size and prefill chunk.  Written here rather than imported from mlc-llm, which does not
install against the apache-tvm 0.27 wheel.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.script import tirx as T


TPB = 256  # threads per block on GPU targets


def _loops(gpu: bool):
    """(block loop, thread loop) constructors: thread-bound on GPU targets, plain serial loops on CPU, so one
    kernel text serves both (a GPU kernel must bind its threads itself: dlight skips in-place processors)."""
    if gpu:
        return (lambda n: T.thread_binding(n, thread="blockIdx.x"),
                lambda n: T.thread_binding(n, thread="threadIdx.x"))
    return T.serial, T.serial


def _attrs(name: str, gpu: bool) -> dict:
    attrs = {"global_symbol": name, "tirx.noalias": True}
    if gpu:
        attrs["tirx.is_scheduled"] = True
    return attrs


def _apply_logit_bias_inplace(gpu: bool):
    block_loop, thread_loop = _loops(gpu)
    attrs = _attrs("apply_logit_bias_inplace", gpu)

    @T.prim_func
    def apply_logit_bias_inplace(var_logits: T.handle, var_pos2seq_id: T.handle, var_token_ids: T.handle,
                                 var_logit_bias: T.handle):
        T.func_attr(attrs)
        batch_size = T.int32()
        vocab_size = T.int32()
        num_token = T.int32()
        logits = T.match_buffer(var_logits, (batch_size, vocab_size), "float32")
        pos2seq_id = T.match_buffer(var_pos2seq_id, (num_token,), "int32")
        token_ids = T.match_buffer(var_token_ids, (num_token,), "int32")
        logit_bias = T.match_buffer(var_logit_bias, (num_token,), "float32")
        for bx in block_loop((num_token + TPB - 1) // TPB):
            for tx in thread_loop(TPB):
                if bx * TPB + tx < num_token:
                    i = bx * TPB + tx
                    logits[pos2seq_id[i], token_ids[i]] = logits[pos2seq_id[i], token_ids[i]] + logit_bias[i]

    return apply_logit_bias_inplace


def _apply_penalty_inplace(gpu: bool):
    block_loop, thread_loop = _loops(gpu)
    attrs = _attrs("apply_penalty_inplace", gpu)

    @T.prim_func
    def apply_penalty_inplace(var_logits: T.handle, var_seq_ids: T.handle, var_pos2seq_id: T.handle,
                              var_token_ids: T.handle, var_token_cnt: T.handle, var_penalties: T.handle):
        """penalties[s] = (presence, frequency, repetition) for sequence slot s."""
        T.func_attr(attrs)
        batch_size = T.int32()
        vocab_size = T.int32()
        num_token = T.int32()
        num_seq = T.int32()
        logits = T.match_buffer(var_logits, (batch_size, vocab_size), "float32")
        seq_ids = T.match_buffer(var_seq_ids, (num_seq,), "int32")
        pos2seq_id = T.match_buffer(var_pos2seq_id, (num_token,), "int32")
        token_ids = T.match_buffer(var_token_ids, (num_token,), "int32")
        token_cnt = T.match_buffer(var_token_cnt, (num_token,), "int32")
        penalties = T.match_buffer(var_penalties, (num_seq, 3), "float32")
        for bx in block_loop((num_token + TPB - 1) // TPB):
            for tx in thread_loop(TPB):
                if bx * TPB + tx < num_token:
                    i = bx * TPB + tx
                    row = seq_ids[pos2seq_id[i]]
                    s = pos2seq_id[i]
                    v = logits[row, token_ids[i]] - (penalties[s, 0]
                                                     + T.Cast("float32", token_cnt[i]) * penalties[s, 1])
                    logits[row, token_ids[i]] = T.if_then_else(v < T.float32(0), v * penalties[s, 2],
                                                               v / penalties[s, 2])

    return apply_penalty_inplace


def _apply_bitmask_inplace(gpu: bool):
    block_loop, thread_loop = _loops(gpu)
    attrs = _attrs("apply_bitmask_inplace", gpu)

    @T.prim_func
    def apply_bitmask_inplace(var_logits: T.handle, var_seq_ids: T.handle, var_bitmask: T.handle):
        """Token v of sequence slot i is allowed iff bit v%32 of bitmask[seq_ids[i], v//32] is set."""
        T.func_attr(attrs)
        batch_size = T.int32()
        vocab_size = T.int32()
        num_seq = T.int32()
        logits = T.match_buffer(var_logits, (batch_size, vocab_size), "float32")
        seq_ids = T.match_buffer(var_seq_ids, (num_seq,), "int32")
        bitmask = T.match_buffer(var_bitmask, (batch_size, (vocab_size + 31) // 32), "int32")
        for bx in block_loop((num_seq * vocab_size + TPB - 1) // TPB):
            for tx in thread_loop(TPB):
                if bx * TPB + tx < num_seq * vocab_size:
                    row = seq_ids[(bx * TPB + tx) // vocab_size]
                    v = (bx * TPB + tx) % vocab_size
                    logits[row, v] = T.if_then_else(
                        T.bitwise_and(T.shift_right(bitmask[row, v // 32], v % 32), 1) == 1,
                        logits[row, v], T.min_value("float32"))

    return apply_bitmask_inplace


def add_logit_processors(mod: tvm.IRModule, target=None) -> tvm.IRModule:
    """The three in-place logit processors, thread-bound on GPU targets."""
    gpu = target is not None and target.kind.name != "llvm"
    for factory in (_apply_logit_bias_inplace, _apply_penalty_inplace, _apply_bitmask_inplace):
        func = factory(gpu)
        mod[func.attrs["global_symbol"]] = func
    return mod


def add_softmax_with_temperature(mod: tvm.IRModule) -> tvm.IRModule:
    """softmax_with_temperature(logits f32[b,1,v], temperature f32[b]) -> f32[b,1,v].

    A temperature <= 1e-5 is clamped to 1e-5, which after max-subtraction gives the argmax one-hot (ties share)."""
    bb = relax.BlockBuilder(mod)
    b, v = tvm.tirx.Var("batch_size", "int64"), tvm.tirx.Var("vocab_size", "int64")
    logits = relax.Var("logits", relax.TensorType([b, 1, v], "float32"))
    temperature = relax.Var("temperature", relax.TensorType([b], "float32"))
    with bb.function("softmax_with_temperature", [logits, temperature]):
        with bb.dataflow():
            t = bb.emit(relax.op.maximum(temperature, relax.const(1e-5, "float32")))
            t = bb.emit(relax.op.reshape(t, relax.ShapeExpr([b, 1, 1])))
            probs = bb.emit(relax.op.nn.softmax(relax.op.divide(logits, t), axis=-1))
            out = bb.emit_output(probs)
        bb.emit_func_output(out)
    return bb.get()


def add_alloc_embedding_tensor(mod: tvm.IRModule, prefill_chunk: int, hidden: int, dtype: str) -> tvm.IRModule:
    bb = relax.BlockBuilder(mod)
    with bb.function("alloc_embedding_tensor", []):
        out = bb.emit(relax.op.builtin.alloc_tensor(relax.ShapeExpr([prefill_chunk, hidden]), dtype, 0))
        bb.emit_func_output(out)
    return bb.get()
