"""Run a compiled artifact on the TVM runtime: weights from the tensor cache, a paged KV cache driven through
``vm.builtin.kv_state_*``, prefill / decode / batch / tree-verify calls, and sampling through the library's
logit functions.
"""

from __future__ import annotations

import json

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from blockffn.artifacts.integrity import check_agrees_with_library
from blockffn.artifacts.reader import Artifact, ArtifactError, open_artifact
from blockffn.errors import BlockFFNError


def _device(kind: str):
    import tvm

    if kind == "cpu":
        return tvm.cpu()
    if kind == "cuda":
        dev = tvm.cuda()
        if not dev.exist:
            raise BlockFFNError("device cuda requested but no CUDA GPU is visible to the TVM runtime")
        return dev
    raise BlockFFNError(f"unknown device {kind!r}; use cpu or cuda")


@dataclass
class KVState:
    """Bookkeeping of the sequences living in the paged cache."""

    lengths: dict = field(default_factory=dict)


class PagedModel:
    """A compiled library with its weights and one paged KV cache: sequence bookkeeping and forward calls.
    Shared by the target model (`Engine`) and the EAGLE draft library (`blockffn.runtime.draft.EagleDraft`)."""

    def __init__(self, folder: Path, library: Path, param_names: list[str], device: str, max_batch: int,
                 context_window: int, prefill_chunk: int, hidden_size: int, functions, dtype: str,
                 max_total_seq_len: int | None = None, page_size: int = 16, manifest: dict | None = None):
        """``manifest``: the artifact manifest the sizes came from, checked against the library's ``_metadata``
        (without it, only the sizes are)."""
        import tvm
        from tvm.runtime.vm import VirtualMachine  # runtime-only: no tvm.relax (compiler) import

        self.folder = Path(folder)
        self.dev = _device(device)
        self.device = device
        self.max_batch, self.context_window, self.prefill_chunk = max_batch, context_window, prefill_chunk
        self.hidden_size, self.dtype = hidden_size, dtype
        self.functions = set(functions)
        try:
            lib = tvm.runtime.load_module(str(library))
        except Exception as e:  # TVM raises its own error classes
            raise ArtifactError(f"{library}: cannot be loaded ({str(e).splitlines()[0]})") from None
        self.lib = lib
        self.vm = VirtualMachine(lib, self.dev)
        sizes = {"context_window_size": context_window, "prefill_chunk_size": prefill_chunk,
                 "max_batch_size": max_batch}
        check_agrees_with_library(json.loads(str(self.vm["_metadata"]())), library, manifest or sizes,
                                  complete=manifest is not None)
        self.params = self._load_params(param_names)
        self._f = {name: tvm.get_global_func(f"vm.builtin.{name}") for name in (
            "kv_state_add_sequence", "kv_state_remove_sequence", "kv_state_fork_sequence",
            "kv_state_begin_forward", "kv_state_end_forward", "kv_state_popn",
            "attention_kv_cache_commit_accepted_token_tree_nodes")}
        self.max_total_seq_len = max_total_seq_len or self.context_window * self.max_batch
        S = tvm.runtime.ShapeTuple
        self.kv = self.vm["create_tir_paged_kv_cache"](S([self.max_batch]), S([self.max_total_seq_len]),
                                                       S([self.prefill_chunk]), S([page_size]), S([0]))
        self.state = KVState()
        self._names: dict = {}
        self._pending_tree: dict = {}  # seq -> (n_tree, parent_ptr) of a tree forward not yet committed
        self.collect_stats = False  # use the *_with_stats functions of a --debug-counts build when present
        self.stats_log: list = []  # router counts of each *_with_stats call

    def _load_params(self, names):
        import tvm

        load = tvm.get_global_func("vm.builtin.tensor_cache.load")
        by_name = tvm.get_global_func("vm.builtin.param_array_from_cache_by_name")
        clear = tvm.get_global_func("vm.builtin.tensor_cache.clear")
        load(str(self.folder), int(self.dev.dlpack_device_type()), int(self.dev.index))
        try:
            return by_name(names)
        finally:
            clear()

    def has_function(self, name: str) -> bool:
        return name in self.functions

    @property
    def dtype_np(self):
        return np.float16 if self.dtype == "float16" else np.float32

    # ------------------------------------------------------------------------------------------ sequences
    def add_sequence(self, seq_id: int) -> None:
        if len(self.state.lengths) >= self.max_batch:
            raise BlockFFNError(f"at most {self.max_batch} sequences (the artifact's max batch size)")
        self._f["kv_state_add_sequence"](self.kv, seq_id)
        self.state.lengths[seq_id] = 0

    def remove_sequence(self, seq_id: int) -> None:
        self._f["kv_state_remove_sequence"](self.kv, seq_id)
        self.state.lengths.pop(seq_id, None)
        self._pending_tree.pop(seq_id, None)

    def fork_sequence(self, parent: int, child: int, fork_pos: int = -1) -> None:
        self._f["kv_state_fork_sequence"](self.kv, parent, child, fork_pos)
        self.state.lengths[child] = self.state.lengths[parent] if fork_pos < 0 else fork_pos

    def popn(self, seq_id: int, n: int) -> None:
        self._no_pending_tree(seq_id)
        if not 0 <= n <= self.state.lengths[seq_id]:
            raise BlockFFNError(f"cannot pop {n} tokens from sequence {seq_id} of {self.state.lengths[seq_id]}")
        if n:
            self._f["kv_state_popn"](self.kv, seq_id, n)
            self.state.lengths[seq_id] -= n

    def reset(self) -> None:
        for sid in list(self.state.lengths):
            self.remove_sequence(sid)

    def _no_pending_tree(self, seq_id: int) -> None:
        # the paged cache cannot pop or extend past an uncommitted token tree (popn then corrupts the cache)
        if seq_id in self._pending_tree:
            raise BlockFFNError(f"sequence {seq_id} has a verified token tree that was not committed; call "
                                f"commit_tree first")

    def _tensor(self, array: np.ndarray):
        import tvm

        return tvm.runtime.tensor(array, self.dev)

    def _check_room(self, seq_ids, lengths) -> None:
        for sid, n in zip(seq_ids, lengths):
            if sid not in self.state.lengths:
                raise BlockFFNError(f"sequence {sid} does not exist")
            if self.state.lengths[sid] + n > self.context_window:
                raise BlockFFNError(f"sequence {sid} would hold {self.state.lengths[sid] + n} tokens, more than the "
                                    f"context window of {self.context_window}")

    def _forward(self, func: str, seq_ids, lengths, args, tree_parent_ptr=None):
        import tvm

        for sid in seq_ids:
            self._no_pending_tree(sid)
        S = tvm.runtime.ShapeTuple
        if tree_parent_ptr is None:
            self._f["kv_state_begin_forward"](self.kv, S(list(seq_ids)), S(list(lengths)))
        else:
            self._f["kv_state_begin_forward"](self.kv, S(list(seq_ids)), S(list(lengths)),
                                              S(list(tree_parent_ptr)))
            self._pending_tree[seq_ids[0]] = (lengths[0], list(tree_parent_ptr))
        if self.collect_stats and func + "_with_stats" in self.functions:
            func = func + "_with_stats"
            out = self.vm[self._names.get(func, func)](*args, self.kv, self.params)
            self.stats_log.append({"function": func, "tokens": int(sum(lengths)),
                                   "counts": out[1].numpy().astype(np.int64)})  # [layers, (union, pairs)]
        else:
            out = self.vm[self._names.get(func, func)](*args, self.kv, self.params)
        self._f["kv_state_end_forward"](self.kv)
        for sid, n in zip(seq_ids, lengths):
            self.state.lengths[sid] += n
        return out[0]

    def commit_tree(self, seq_id: int, accepted_leaf: int) -> None:
        """Keep the path root..``accepted_leaf`` of the last tree forward of ``seq_id`` (-1 keeps nothing)."""
        import tvm

        if seq_id not in self._pending_tree:
            raise BlockFFNError(f"sequence {seq_id} has no token tree to commit")
        n_tree, parents = self._pending_tree.pop(seq_id)
        S = tvm.runtime.ShapeTuple
        self._f["attention_kv_cache_commit_accepted_token_tree_nodes"](self.kv, S([seq_id]), S([accepted_leaf]))
        depth, node = 0, accepted_leaf
        while node >= 0:
            depth, node = depth + 1, parents[node]
        self.state.lengths[seq_id] += depth - n_tree


class Engine(PagedModel):
    """The target model's library: embed, prefill, decode, batch calls, tree verification, sampling helpers."""

    def __init__(self, artifact_dir, device: str = "cpu", max_total_seq_len: int | None = None,
                 page_size: int = 16, verify_md5: bool = True, ffn: str = "auto", model_lib=None):
        """``ffn``: ``auto`` runs the functions as compiled (sparse where the artifact's policy made them sparse),
        except that prefill calls of a ``--ffn auto`` build run chunked-union or dense, whichever measured faster on
        this device (`blockffn.runtime.prefill_choice`); ``sparse`` always runs the sparse lowering; ``dense`` runs
        the dense twins (same weights, every expert computed).  ``model_lib``: a library built alone
        (``blockffn-compile -o NAME.so``) to run over this folder's weights instead of the manifest's."""
        self.art: Artifact = open_artifact(artifact_dir, verify_md5=verify_md5, model_lib=model_lib)
        m = self.art.manifest
        if m["target"]["device"] != device:
            raise ArtifactError(f"{artifact_dir}: built for device {m['target']['device']}, not {device}")
        self.cfg = self.art.config
        super().__init__(self.art.path, self.art.library, self.art.param_names, device, m["max_batch_size"],
                         m["context_window_size"], m["prefill_chunk_size"], self.cfg.hidden_size,
                         m.get("functions", []), m["dtype"], max_total_seq_len, page_size,
                         manifest=m if model_lib is None else None)
        self.ffn = ffn
        self._names = self._function_names(ffn)
        self._tokenizer = None
        ffn_meta = m.get("ffn") or {}
        # chunked-union (prefill) function -> its dense twin, when this engine chooses between them by measurement
        twins = ffn_meta.get("dense_twins", {})
        self._prefill_twins = ({f: twins[f] for f in ffn_meta.get("union_chunk", {}) if f in twins}
                               if ffn == "auto" and ffn_meta.get("policy") == "auto" else {})
        self._prefill_choice = False  # not measured yet; None: nothing to choose

    def _function_names(self, ffn: str) -> dict:
        twins = (self.art.manifest.get("ffn") or {}).get("dense_twins", {})
        if ffn in ("auto", "sparse"):
            return {}
        if ffn == "dense":
            return dict(twins)
        raise BlockFFNError(f"unknown ffn mode {ffn!r}; use auto, sparse or dense")

    def measure_prefill_choice(self) -> None:
        """Time chunked-union against dense prefill once (cached on disk; see `blockffn.runtime.prefill_choice`).
        Needs a free sequence slot: callers that fill every slot call this first (`Generator` does).  A failed
        measurement leaves the library's compiled prefill in use."""
        if not self._prefill_twins or self._prefill_choice is not False or len(self.state.lengths) >= self.max_batch:
            return  # measured already, or no scratch slot now (try again at a later prefill)
        from blockffn.runtime.prefill_choice import prefill_choice

        self._prefill_choice = None  # while measuring (and if it fails): the compiled functions
        try:
            self._prefill_choice = prefill_choice(self)
        except (BlockFFNError, RuntimeError):  # TVM's errors are RuntimeErrors
            pass  # e.g. no KV-cache pages left for the scratch prompt: keep the compiled prefill

    def prefill_function(self, name: str, n_tokens: int) -> str:
        """``name`` or its dense twin for an ``n_tokens`` prefill call (see `__init__`'s ``ffn``)."""
        twin = self._prefill_twins.get(name)
        if twin is None:
            return name
        self.measure_prefill_choice()
        if self._prefill_choice and twin in self.functions and self._prefill_choice.dense(n_tokens):
            return twin
        return name

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from blockffn.data.prepare import load_tokenizer

            self._tokenizer = load_tokenizer(self.art.path)
        return self._tokenizer

    # ------------------------------------------------------------------------------------------ model calls
    def embed(self, token_ids) -> "object":
        ids = np.asarray(token_ids, dtype=np.int32)
        if ids.size and (ids.min() < 0 or ids.max() >= self.cfg.vocab_size):
            raise BlockFFNError(f"token id out of range 0..{self.cfg.vocab_size - 1}")
        return self.vm["embed"](self._tensor(ids), self.params)

    def _reshaped_embeds(self, token_ids, shape):
        """The embeddings as a reshaped alias of the device tensor: no copy.  (A round trip through numpy here
        cost a device sync and two copies per decode step: 0.19 ms of a 2.3 ms step on an H200.)"""
        emb = self.embed(token_ids)
        view = getattr(emb, "_create_view", None) or emb.view  # TVM 0.27 spells the alias `_create_view`
        return view(tuple(shape))

    def prefill(self, seq_id: int, token_ids) -> np.ndarray:
        """Prefill in chunks of the artifact's prefill size; returns the last token's logits [V]."""
        token_ids = list(token_ids)
        if not token_ids:
            raise BlockFFNError("cannot prefill zero tokens")
        self._check_room([seq_id], [len(token_ids)])
        logits = None
        for i in range(0, len(token_ids), self.prefill_chunk):
            chunk = token_ids[i: i + self.prefill_chunk]
            emb = self._reshaped_embeds(chunk, (1, len(chunk), self.cfg.hidden_size))
            logits = self._forward(self.prefill_function("prefill", len(chunk)), [seq_id], [len(chunk)], [emb])
        return logits.numpy()[0, -1]

    def decode(self, seq_id: int, token: int) -> np.ndarray:
        self._check_room([seq_id], [1])
        emb = self._reshaped_embeds([token], (1, 1, self.cfg.hidden_size))
        return self._forward("decode", [seq_id], [1], [emb]).numpy()[0, 0]

    def batch_prefill(self, seq_ids, token_lists) -> np.ndarray:
        """One ragged prefill over several sequences; returns [batch, V] logits of each one's last token."""
        lengths = [len(t) for t in token_lists]
        self._check_room(seq_ids, lengths)
        flat = [t for toks in token_lists for t in toks]
        if len(flat) > self.prefill_chunk:
            raise BlockFFNError(f"batch_prefill of {len(flat)} tokens exceeds the prefill chunk {self.prefill_chunk}")
        emb = self._reshaped_embeds(flat, (1, len(flat), self.cfg.hidden_size))
        positions = self._tensor(np.cumsum(lengths).astype(np.int32) - 1)
        func = self.prefill_function("batch_prefill", len(flat))
        return self._forward(func, seq_ids, lengths, [emb, positions]).numpy()[0]

    def batch_decode(self, seq_ids, tokens) -> np.ndarray:
        self._check_room(seq_ids, [1] * len(seq_ids))
        emb = self._reshaped_embeds(list(tokens), (len(tokens), 1, self.cfg.hidden_size))
        return self._forward("batch_decode", seq_ids, [1] * len(seq_ids), [emb]).numpy()[:, 0]

    def batch_verify(self, seq_id: int, tokens, parent_ptr) -> np.ndarray:
        """Score a token tree (``parent_ptr[i]`` = index of node i's parent, -1 for children of the last
        committed token) in one call with tree attention; returns [n, V].  Call `commit_tree` afterwards."""
        if len(tokens) != len(parent_ptr):
            raise BlockFFNError("tokens and parent_ptr must have the same length")
        self._check_room([seq_id], [len(tokens)])
        emb = self._reshaped_embeds(list(tokens), (1, len(tokens), self.cfg.hidden_size))
        out = self._forward("batch_verify", [seq_id], [len(tokens)], [emb], tree_parent_ptr=parent_ptr)
        return out.numpy()[0]

    def verify_hidden(self, seq_id: int, tokens, parent_ptr) -> np.ndarray:
        """`batch_verify` returning the final-norm hidden states [n, d] (what an EAGLE draft reads) instead of
        logits; `get_logits` turns rows of them into logits."""
        if len(tokens) != len(parent_ptr):
            raise BlockFFNError("tokens and parent_ptr must have the same length")
        self._check_room([seq_id], [len(tokens)])
        emb = self._reshaped_embeds(list(tokens), (1, len(tokens), self.cfg.hidden_size))
        out = self._forward("batch_verify_to_last_hidden_states", [seq_id], [len(tokens)], [emb],
                            tree_parent_ptr=parent_ptr)
        return out.numpy()[0]

    def prefill_hidden(self, seq_id: int, token_ids) -> np.ndarray:
        """Prefill (in chunks) returning every position's final-norm hidden state [n, d]."""
        token_ids = list(token_ids)
        if not token_ids:
            raise BlockFFNError("cannot prefill zero tokens")
        self._check_room([seq_id], [len(token_ids)])
        parts = []
        for i in range(0, len(token_ids), self.prefill_chunk):
            chunk = token_ids[i: i + self.prefill_chunk]
            emb = self._reshaped_embeds(chunk, (1, len(chunk), self.cfg.hidden_size))
            func = self.prefill_function("prefill_to_last_hidden_states", len(chunk))
            parts.append(self._forward(func, [seq_id], [len(chunk)], [emb]).numpy()[0])
        return np.concatenate(parts)

    def decode_hidden(self, seq_id: int, token: int) -> np.ndarray:
        """`decode` returning the final-norm hidden state [d] instead of logits."""
        self._check_room([seq_id], [1])
        emb = self._reshaped_embeds([token], (1, 1, self.cfg.hidden_size))
        return self._forward("decode_to_last_hidden_states", [seq_id], [1], [emb]).numpy()[0, 0]

    def get_logits(self, hidden: np.ndarray) -> np.ndarray:
        """Logits [n, V] (float32) of final-norm hidden states [n, d]."""
        h = self._tensor(np.ascontiguousarray(hidden, dtype=self.dtype_np))
        return self.vm["get_logits"](h, self.params).numpy()

    def observed_sparsity(self, num_experts: int | None = None) -> dict:
        """From the router counts of a ``--debug-counts`` build (``collect_stats = True``): measured token-level
        sparsity (TLS) and the mean union of active experts per call, overall and for decode / verify calls."""
        E = num_experts or self.cfg.num_experts
        out = {}
        for label, names in (("all", None), ("decode", ("decode",)), ("verify", ("batch_verify",))):
            recs = [r for r in self.stats_log if names is None or r["function"].startswith(names)]
            if not recs:
                continue
            pairs = sum(int(r["counts"][:, 1].sum()) for r in recs)
            slots = sum(r["tokens"] * r["counts"].shape[0] * E for r in recs)
            unions = np.concatenate([r["counts"][:, 0] for r in recs])
            out[label] = {"calls": len(recs), "tls": 1 - pairs / slots, "mean_union": float(unions.mean()),
                          "mean_union_fraction": float(unions.mean()) / E}
        return out

    def library_function(self, name: str):
        """A TIR function of the library (e.g. the in-place logit processors), as MLC's runtime looks it up."""
        return self.lib.get_function(name, query_imports=True)
