"""File names and the JSON documents of an artifact folder (research/mlc.md §1)."""

from __future__ import annotations

from blockffn.model.config import BlockFFNConfig

CHAT_CONFIG = "mlc-chat-config.json"
TENSOR_CACHE = "tensor-cache.json"
LEGACY_TENSOR_CACHE = "ndarray-cache.json"  # runtimes from before Sept 2025 look for this name
MANIFEST = "blockffn-manifest.json"
MLC_CHAT_CONFIG_VERSION = "0.1.0"
ARTIFACT_FORMAT = "blockffn-artifact/1"
LIBRARY_MANIFEST_KEY = "blockffn"  # `_metadata` key holding the library's half of the manifest
DRAFT_FOLDER = "draft"  # an artifact's built-in EAGLE draft: ARTIFACT/draft/, described by its own manifest
DRAFT_FORMAT = "blockffn-draft/1"
DRAFT_MANIFEST = "blockffn-draft.json"
# model_config keys of mlc-chat-config.json that are MLC's, not the checkpoint's
CHAT_ONLY_MODEL_KEYS = ("context_window_size", "prefill_chunk_size", "tensor_parallel_shards", "max_batch_size")

# The unquantized weight layout of a library (the q4 one is blockffn.artifacts.q4.Q4_EXPERT_LAYOUT).
DOWN_PROJ_TRANSPOSED = "model.layers.*.mlp.down_proj: HF [d, E*De] stored transposed as [E*De, d]"
# Every library (vanilla attention): q, k and v are one GEMV per layer, two kernel launches fewer per decode step.
FUSED_QKV = "model.layers.*.self_attn.qkv_proj: HF q_proj, k_proj, v_proj concatenated along the output rows"
QKV_PARTS = ("q_proj", "k_proj", "v_proj")

# --dtype name -> model (compute) dtype; q4* are group-quantized (blockffn.artifacts.q4)
QUANTIZATIONS = {"q0f32": "float32", "q0f16": "float16", "q0bf16": "bfloat16", "q4f16_1": "float16",
                 "q4f32_1": "float32"}


def storage_dtype(quantization: str) -> str:
    from blockffn.errors import BlockFFNError

    try:
        return QUANTIZATIONS[quantization]
    except KeyError:
        raise BlockFFNError(f"unknown --dtype {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}") from None


def conv_template(cfg: BlockFFNConfig) -> dict:
    """A plain completion template (the bundled model is a base LM): the user text is the prompt as-is."""
    return {
        "name": "blockffn-plain",
        "system_template": "{system_message}",
        "system_message": "",
        "system_prefix_token_ids": None,
        "add_role_after_system_message": False,
        "roles": {"user": "", "assistant": ""},
        "role_templates": {"user": "{user_message}", "assistant": "{assistant_message}", "tool": "{tool_message}"},
        "messages": [],
        "seps": ["\n"],
        "role_content_sep": "",
        "role_empty_sep": "",
        "stop_str": [],
        "stop_token_ids": [cfg.eos_token_id],
        "strip_reasoning_in_history": False,
        "function_string": "",
        "use_function_calling": False,
    }


def chat_config(cfg: BlockFFNConfig, quantization: str, context_window: int, prefill_chunk: int,
                max_batch_size: int, tokenizer_files: list[str]) -> dict:
    """mlc-chat-config.json with every key the MLC engines read (pydantic MLCChatConfig field order)."""
    model_config = cfg.to_hf_dict()
    model_config.update(context_window_size=context_window, prefill_chunk_size=prefill_chunk,
                        tensor_parallel_shards=1, max_batch_size=max_batch_size)
    return {
        "version": MLC_CHAT_CONFIG_VERSION,
        "model_type": "blockffn",
        "quantization": quantization,
        "model_config": model_config,
        "vocab_size": cfg.vocab_size,
        "context_window_size": context_window,
        "sliding_window_size": -1,
        "prefill_chunk_size": prefill_chunk,
        "attention_sink_size": -1,
        "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1,
        "active_vocab_size": cfg.vocab_size,
        "temperature": 0.8,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "repetition_penalty": 1.0,
        "top_p": 0.95,
        "tokenizer_files": tokenizer_files,
        "tokenizer_info": {"token_postproc_method": "byte_level", "prepend_space_in_encode": False,
                           "strip_space_in_decode": False},
        "conv_template": conv_template(cfg),
        "pad_token_id": cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "model_task": "chat",
    }


def config_from_chat_config(chat: dict, where) -> BlockFFNConfig:
    """The model's config from an mlc-chat-config.json document (its ``model_config``)."""
    from blockffn.errors import ConfigError

    model_config = chat.get("model_config") if isinstance(chat, dict) else None
    if not isinstance(model_config, dict):
        raise ConfigError(f"{where}: no model_config object (not an mlc-chat-config.json written by blockffn)")
    return BlockFFNConfig.from_hf_dict({k: v for k, v in model_config.items() if k not in CHAT_ONLY_MODEL_KEYS})


_MANIFEST_METADATA_KEYS = (LIBRARY_MANIFEST_KEY, "ffn", "functions", "params", "memory_usage")  # stored apart


def manifest_from_metadata(metadata: dict, library: str) -> dict:
    """An artifact manifest from a library's ``_metadata``: its embedded half (target, quantization, weight
    layout, sizes, versions, passes) plus the FFN lowering, exported functions, parameters and memory plan."""
    manifest = dict(metadata[LIBRARY_MANIFEST_KEY])
    manifest.update(library=library, ffn=metadata["ffn"], functions=metadata["functions"],
                    params=[{k: p[k] for k in ("name", "shape", "dtype")} for p in metadata["params"]],
                    memory_usage=metadata["memory_usage"],
                    # the rest of _metadata (MLC's keys: model_type, kv_cache, sizes, versions), so that inspect
                    # shows it without loading the library
                    metadata={k: v for k, v in metadata.items() if k not in _MANIFEST_METADATA_KEYS})
    manifest.setdefault("draft", None)
    return manifest


def library_sources(name: str) -> list[str]:
    """The checkpoint tensors (HF names) one library tensor is made from, in order (HF-style library name,
    before any quantization suffix)."""
    if name.endswith("self_attn.qkv_proj.weight"):
        base = name[: -len("qkv_proj.weight")]
        return [base + part + ".weight" for part in QKV_PARTS]
    return [name]


def to_library_layout(name: str, tensor):
    """The compile-time layout of one HF tensor (torch) in an unquantized library: each expert's rows of the
    down-projection contiguous, like the up-projection's."""
    if name.endswith("mlp.down_proj"):
        return tensor.t().contiguous()
    return tensor
