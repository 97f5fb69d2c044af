"""Named shapes: the official BlockFFN checkpoints (research/blockffn.md §3.1) plus our bundled tiny model."""

from __future__ import annotations

from blockffn.errors import ConfigError
from blockffn.model.config import BlockFFNConfig

_MLA = dict(attention_type="mla", q_lora_rank=768, kv_lora_rank=256, qk_nope_head_dim=128, qk_rope_head_dim=64,
            v_head_dim=128, vocab_size=122753, intermediate_size=5760, num_key_value_heads=32)

PRESETS: dict[str, dict] = {
    "small": dict(_MLA, hidden_size=768, num_hidden_layers=16, num_attention_heads=6, num_experts=48, expert_size=64),
    "medium": dict(_MLA, hidden_size=1280, num_hidden_layers=27, num_attention_heads=10, num_experts=40,
                   expert_size=128),
    "large": dict(_MLA, hidden_size=1536, num_hidden_layers=32, num_attention_heads=12, num_experts=48,
                  expert_size=128),
    "xlarge": dict(_MLA, hidden_size=1792, num_hidden_layers=35, num_attention_heads=14, num_experts=56,
                   expert_size=128),
    # 2.8B acceleration model: GQA (official attention_type "vanilla") 16 q heads x 128, 4 KV heads (inferred, research/blockffn.md §2.3).
    "3b": dict(attention_type="vanilla", hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=4, head_dim=128, num_experts=128, expert_size=128, intermediate_size=16384,
               vocab_size=73440),
    # The bundled default model: MLA like the official small family, scaled to train on 2 CPU cores.
    "tiny": dict(attention_type="mla", hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32,
                 v_head_dim=64, num_experts=16, expert_size=64, intermediate_size=1024, vocab_size=4096,
                 max_position_embeddings=1024),
    # The bundled default model since 2026-12 (12.2M parameters, 24.4 MB in bf16): "tiny" widened to d 384 and
    # 24 experts, trained on a GPU; "tiny" stays the small shape of random-weight tests.
    "mini": dict(attention_type="mla", hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                 num_key_value_heads=6, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32,
                 v_head_dim=64, num_experts=24, expert_size=64, intermediate_size=1536, vocab_size=4096,
                 max_position_embeddings=1024),
    # GQA counterpart of "tiny" (same FFN), used by tests of the GQA family.
    "tiny-gqa": dict(attention_type="vanilla", hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64, num_experts=16, expert_size=64, intermediate_size=1024,
                     vocab_size=4096, max_position_embeddings=1024),
}


def preset_config(name: str, **overrides) -> BlockFFNConfig:
    """Config of a named preset; ``overrides`` (e.g. ``num_hidden_layers=2``) replace single keys."""
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    values = dict(PRESETS[key])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return BlockFFNConfig(**values).validate()
