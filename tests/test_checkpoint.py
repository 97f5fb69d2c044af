"""Official HF checkpoint format: bit-exact round trips, sharding, and one-line errors that write nothing."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from blockffn.errors import CheckpointError, ConfigError
from blockffn.model import BlockFFNForCausalLM, load_model, save_model
from blockffn.model.checkpoint import expected_shapes
from tests.conftest import small_config


def cli(*args):
    return subprocess.run([sys.executable, "-m", "blockffn.cli", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shard", [None, 200_000])
def test_round_trip_is_bit_exact(tmp_path, attention, dtype, shard):
    model = BlockFFNForCausalLM(small_config(attention)).init_weights(seed=2)
    save_model(model, tmp_path / "m", dtype=dtype, max_shard_bytes=shard)
    if shard:
        index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    loaded = load_model(tmp_path / "m", dtype=dtype)
    dt = getattr(torch, dtype)
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t.to(dt)), name
    # and the written bytes read back identically a second time
    save_model(loaded, tmp_path / "m2", dtype=dtype, max_shard_bytes=shard)
    for name, t in load_model(tmp_path / "m2", dtype=dtype).state_dict().items():
        assert torch.equal(t, loaded.state_dict()[name])


def test_official_names_and_config_keys(tmp_path):
    cfg = small_config("mla")
    save_model(BlockFFNForCausalLM(cfg).init_weights(0), tmp_path / "m")
    names = set(load_file(str(tmp_path / "m" / "model.safetensors")))
    assert "model.layers.0.mlp.up_proj" in names and "model.layers.0.mlp.down_proj" in names  # no .weight
    assert {"model.layers.1.mlp.router_proj.weight", "model.layers.1.mlp.router_norm.weight",
            "model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "lm_head.weight"} <= names
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    for key in ("num_experts", "expert_size", "router_act", "norm_after_router", "attention_type", "q_lora_rank",
                "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "scale_emb", "dim_model_base",
                "scale_depth", "ffn_type", "tie_word_embeddings", "rms_norm_eps", "architectures"):
        assert key in raw, key
    assert raw["router_act"] == "relu" and raw["norm_after_router"] == "rms" and raw["ffn_type"] == "block_linear"
    assert raw["architectures"] == ["MiniCPMForCausalLM"] and raw["torch_dtype"] == "bfloat16"


def test_official_xlarge_config_is_understood():
    """The exact config.json of SparseLLM/BlockFFN-XLarge (research/blockffn.md §3.2)."""
    from blockffn.model import BlockFFNConfig

    raw = {"architectures": ["MiniCPMForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
           "hidden_size": 1792, "initializer_range": 0.1, "intermediate_size": 5760, "max_position_embeddings": 4096,
           "num_attention_heads": 14, "num_hidden_layers": 35, "num_key_value_heads": 32, "rms_norm_eps": 1e-05,
           "rope_scaling": None, "torch_dtype": "bfloat16", "vocab_size": 122753, "scale_emb": 12,
           "dim_model_base": 256, "scale_depth": 1.4, "tie_word_embeddings": False, "norm_after_router": "rms",
           "norm_scale": 1.0, "attention_type": "mla", "q_lora_rank": 768, "kv_lora_rank": 256,
           "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "ffn_type": "block_linear",
           "ffn_gated": True, "router_act": "relu", "expert_size": 128, "num_experts": 56,
           "block_implementation": "torch", "model_type": "minicpm"}
    cfg = BlockFFNConfig.from_hf_dict(raw)
    assert cfg.rope_theta == 10000.0 and cfg.mla_q_head_dim == 192 and cfg.ffn_width == 7168
    shapes = expected_shapes(cfg)
    assert shapes["model.layers.0.self_attn.q_b_proj.weight"] == (14 * 192, 768)
    assert shapes["model.layers.0.self_attn.kv_b_proj.weight"] == (14 * 256, 256)
    assert shapes["model.layers.34.mlp.down_proj"] == (1792, 7168)


def _corrupt(tmp_path, mutate):
    model = BlockFFNForCausalLM(small_config()).init_weights(0)
    save_model(model, tmp_path / "bad")
    path = tmp_path / "bad" / "model.safetensors"
    tensors = load_file(str(path))
    mutate(tensors)
    save_file(tensors, str(path))
    return tmp_path / "bad"


@pytest.mark.parametrize("mutate,needle", [
    (lambda t: t.pop("model.layers.1.mlp.router_norm.weight"), "model.layers.1.mlp.router_norm.weight"),
    (lambda t: t.__setitem__("model.layers.0.mlp.extra_proj.weight", torch.zeros(2)), "extra_proj"),
    (lambda t: t.__setitem__("model.layers.0.mlp.up_proj", torch.zeros(8, 8)), "model.layers.0.mlp.up_proj"),
])
def test_bad_tensors_fail_with_one_line_and_write_nothing(tmp_path, mutate, needle):
    bad = _corrupt(tmp_path, mutate)
    with pytest.raises(CheckpointError, match=needle.replace(".", r"\.")):
        load_model(bad)
    r = cli("convert", "--model", bad, "--output", tmp_path / "out")
    assert r.returncode != 0
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_config_contradicting_weights(tmp_path):
    model = BlockFFNForCausalLM(small_config()).init_weights(0)
    save_model(model, tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    raw["num_experts"] = 8  # weights were written for 16 experts
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    r = cli("convert", "--model", tmp_path / "m", "--output", tmp_path / "out")
    assert r.returncode != 0 and "router_proj" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit,key", [({"router_act": "softmax"}, "router_act"), ({"hidden_size": "big"}, "hidden_size"),
                                      ({"attention_type": "linear"}, "attention_type"),
                                      ({"v_head_dim": 12}, "v_head_dim")])
def test_malformed_config_names_the_key(tmp_path, edit, key):
    save_model(BlockFFNForCausalLM(small_config()).init_weights(0), tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    raw.update(edit)
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=key):
        load_model(tmp_path / "m")


def test_truncated_safetensors_and_missing_shard(tmp_path):
    model = BlockFFNForCausalLM(small_config()).init_weights(0)
    save_model(model, tmp_path / "m")
    p = tmp_path / "m" / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(tmp_path / "m")
    save_model(model, tmp_path / "s", max_shard_bytes=200_000)
    next((tmp_path / "s").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_model(tmp_path / "s")


def test_pickle_is_never_executed(tmp_path):
    model = BlockFFNForCausalLM(small_config()).init_weights(0)
    save_model(model, tmp_path / "m")
    sd = load_file(str(tmp_path / "m" / "model.safetensors"))
    (tmp_path / "m" / "model.safetensors").unlink()
    # a plain tensor state dict in pytorch_model.bin is read with weights_only=True ...
    torch.save(sd, tmp_path / "m" / "pytorch_model.bin")
    loaded = load_model(tmp_path / "m", dtype="bfloat16")
    assert torch.equal(loaded.state_dict()["model.norm.weight"], sd["model.norm.weight"])

    # ... while a pickle carrying code is refused without running it
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "pytorch_model.bin").unlink()
    torch.save(sd, tmp_path / "m" / "model.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_model(tmp_path / "m")


def test_fused_qkv_of_the_3b_loader_is_split(tmp_path):
    model = BlockFFNForCausalLM(small_config("gqa")).init_weights(0)
    save_model(model, tmp_path / "m", dtype="float32")
    path = tmp_path / "m" / "model.safetensors"
    sd = load_file(str(path))
    for i in range(model.config.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        sd[p + "qkv_proj.weight"] = torch.cat([sd.pop(p + n) for n in ("q_proj.weight", "k_proj.weight",
                                                                           "v_proj.weight")])
    save_file(sd, str(path))
    loaded = load_model(tmp_path / "m")
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


@pytest.mark.parametrize("fraction", [0.125, 0.25, 0.5])
def test_init_force_active_routes_exactly_that_fraction(tmp_path, fraction):
    """The benchmark construction: every token of every layer activates exactly round(F·E) experts (the same ones),
    measured through the PyTorch model's own router on random tokens."""
    r = cli("init", "--preset", "tiny-gqa", "--layers", 3, "--force-active", fraction, "--dtype", "float32",
            "--output", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    model = load_model(tmp_path / "m")
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids)
    E = model.config.num_experts
    for a0 in out.router_logits:
        active = a0 > 0
        assert (active.sum(-1) == round(fraction * E)).all()
        assert (active == active[:1, :1]).all()  # the same experts for every token
    r = cli("init", "--preset", "tiny", "--force-active", 0, "--output", tmp_path / "bad")
    assert r.returncode != 0 and "--force-active" in r.stderr and not (tmp_path / "bad").exists()
