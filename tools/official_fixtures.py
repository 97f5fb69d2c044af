"""Golden fixtures from the official BlockFFN Hugging Face code (run by hand, never in CI).

The official ``configuration_minicpm.py`` / ``modeling_minicpm.py`` (thunlp/BlockFFN ``pretrain/bmt_to_hf``) are
run from a copy you fetched yourself; nothing is downloaded and none of their code enters this repository.  Two
directions are checked:

* official -> ours: small random checkpoints of both attention families (MLA and "vanilla" GQA; tied and untied
  heads; a sharded bf16 one; a fused ``qkv_proj`` and 3-D ``ffn_type: block`` variant) are built and saved with the
  official code (``save_pretrained``), with their official fp32 logits and greedy tokens as ``golden.npz``;
* ours -> official: checkpoints written by ``blockffn init`` (MLA and vanilla) are loaded by the official code
  through ``AutoModelForCausalLM.from_pretrained(trust_remote_code=True)`` with the two official files put beside
  ``config.json``, and by the official engine's config reader (``inference/llamacu/llama.py:43-62``, transcribed
  below because its CUDA extension cannot be imported on a CPU); their official logits become fixtures as well,
  with the sha256 of what ``init`` wrote (the test re-runs ``init`` and checks it still writes those bytes).

``tests/test_official_interop.py`` then checks that our PyTorch model and the compiled CPU artifact reproduce every
fixture.  Setup (the official code targets transformers 4.36, see its config.json)::

    python3.11 -m venv VENV
    VENV/bin/pip install torch==2.13.0 transformers==4.36.2 safetensors numpy
    git --git-dir=<mirror of thunlp/BlockFFN> archive HEAD pretrain/bmt_to_hf | tar x -C OFFICIAL
    VENV/bin/python tools/official_fixtures.py --official OFFICIAL/pretrain/bmt_to_hf \\
        --blockffn .venv/bin/blockffn
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

PROMPT = [1, 17, 42, 99, 7, 130, 5, 64, 201, 33, 12, 250]
NEW_TOKENS = 24
VOCAB = 256
OFFICIAL_FILES = ("configuration_minicpm.py", "modeling_minicpm.py")

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
               ffn_type="block_linear", num_experts=8, expert_size=16, router_act="relu", norm_after_router="rms",
               norm_scale=1.0, block_implementation="torch", hidden_act="silu", rms_norm_eps=1e-5, scale_emb=12,
               dim_model_base=16, scale_depth=1.4, max_position_embeddings=256, initializer_range=0.1,
               bos_token_id=1, eos_token_id=2)
_MLA = dict(_COMMON, attention_type="mla", q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16)
_VANILLA = dict(_COMMON, attention_type="vanilla", num_key_value_heads=2)

# name -> (config overrides, save dtype, max shard size, stored-layout rewrite)
CASES = {
    "mla-untied": (dict(_MLA, tie_word_embeddings=False), torch.float32, None, None),
    "mla-tied": (dict(_MLA, tie_word_embeddings=True), torch.float32, None, None),
    "vanilla-untied": (dict(_VANILLA, tie_word_embeddings=False), torch.float32, None, None),
    "vanilla-tied-sharded-bf16": (dict(_VANILLA, tie_word_embeddings=True), torch.bfloat16, "40KB", None),
    "vanilla-block3d-fusedqkv": (dict(_VANILLA, tie_word_embeddings=False, ffn_type="block"), torch.float32, None,
                                 "fuse_qkv"),
}


def import_official(official: Path):
    """Import the official modules as a package, with stand-ins for the optional MoE back-ends it imports at the
    top (fastmoe, megablocks, dm-tree, its CUDA kernel), which the block_linear/torch path never calls."""
    for name in ("fmoe", "fmoe.linear", "fmoe.layers", "megablocks", "tree", "blockffn_kernel"):
        mod = types.ModuleType(name)
        mod.MOELinear = mod._fmoe_general_global_forward = mod.stk = mod.sparse_act = mod.dMoE = mod.BlockFFN = object
        sys.modules.setdefault(name, mod)
    pkg = Path(tempfile.mkdtemp()) / "official_minicpm"
    pkg.mkdir()
    for f in OFFICIAL_FILES:
        shutil.copy(official / f, pkg / f)
    (pkg / "__init__.py").write_text("")
    sys.path.insert(0, str(pkg.parent))
    from official_minicpm.configuration_minicpm import MiniCPMConfig
    from official_minicpm.modeling_minicpm import MiniCPMForCausalLM
    return MiniCPMConfig, MiniCPMForCausalLM


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (the official _init_weights leaves BlockMLP's nn.Parameters uninitialised); norm
    weights near 1 and the router biased so that about half of the experts fire per token."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)


def official_outputs(model) -> tuple[np.ndarray, np.ndarray]:
    """fp32 logits of the prompt and 24 greedy tokens (official generate with its KV cache)."""
    model = model.float().eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = model(ids).logits[0].float().numpy()
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
                             min_new_tokens=NEW_TOKENS)
    return logits, out[0, len(PROMPT):].numpy()


def fuse_qkv(folder: Path) -> None:
    """Rewrite a vanilla checkpoint with the fused ``qkv_proj`` that the official engine's loader splits."""
    from safetensors.torch import load_file, save_file
    path = folder / "model.safetensors"
    sd = load_file(str(path))
    for name in [n for n in sd if n.endswith("self_attn.q_proj.weight")]:
        base = name[: -len("q_proj.weight")]
        sd[base + "qkv_proj.weight"] = torch.cat([sd.pop(base + f"{x}_proj.weight") for x in "qkv"])
    save_file(sd, str(path), metadata={"format": "pt"})


def official_to_ours(official: Path, out: Path) -> None:
    MiniCPMConfig, MiniCPMForCausalLM = import_official(official)
    for i, (name, (overrides, dtype, shard, rewrite)) in enumerate(CASES.items()):
        torch.manual_seed(i)
        config = MiniCPMConfig(**overrides)
        config._attn_implementation = "eager"
        model = MiniCPMForCausalLM(config)
        randomise(model, seed=100 + i)
        folder = out / name
        shutil.rmtree(folder, ignore_errors=True)
        model.to(dtype).save_pretrained(folder, safe_serialization=True, max_shard_size=shard or "10GB")
        # The reference is what the official loader makes of the saved files, in fp32 (a model cast to bf16 in
        # memory would also carry bf16-rounded RoPE buffers, which no loaded checkpoint has).
        loaded = MiniCPMForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager")
        logits, tokens = official_outputs(loaded)
        if rewrite == "fuse_qkv":
            fuse_qkv(folder)
        np.savez_compressed(folder / "golden.npz", prompt=np.array(PROMPT), logits=logits, greedy=tokens)
        print(f"{name}: {sorted(p.name for p in folder.iterdir())}")
    try:
        MiniCPMForCausalLM(MiniCPMConfig(**dict(_MLA, q_lora_rank=None)))
        print("q_lora_rank null: the official code builds it")
    except Exception as e:  # noqa: BLE001 - we report whatever the official code raises
        print(f"q_lora_rank null: the official code refuses it ({type(e).__name__}: {e})")


def engine_config_reader(folder: Path) -> dict:
    """The official engine's reading of config.json (``llamacu/llama.py:33-62``), without its CUDA extension."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    dtype = getattr(torch, config.torch_dtype) if isinstance(config.torch_dtype, str) else config.torch_dtype
    if dtype not in (torch.float16, torch.bfloat16):  # dtype_to_int
        raise ValueError(f"Unsupported dtype: {dtype}")
    if not hasattr(config, "head_dim"):
        if hasattr(config, "attn_type") and config.attn_type == "mla":
            config.head_dim = config.v_head_dim
        else:
            config.head_dim = config.hidden_size // config.num_attention_heads
    args = dict(vocab_size=config.vocab_size, num_hidden_layers=config.num_hidden_layers,
                hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps)
    # what the engine's kernels hard-code (block_ffn.cuh / layer.cuh): blocks of 128 over intermediate_size
    assert config.intermediate_size == config.num_experts * 128 and config.expert_size == 128, args
    return args


def init_digest(folder: Path) -> str:
    """sha256 over config.json and the weights written by ``blockffn init`` (single file)."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        h.update((folder / name).read_bytes())
    return h.hexdigest()


def ours_to_official(official: Path, blockffn: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM
    small = ["--layers", "2", "--vocab-size", str(VOCAB)]
    cases = {"ours-mla": ["--preset", "tiny", *small], "ours-vanilla": ["--preset", "tiny-gqa", *small]}
    for name, args in cases.items():
        folder = out / name
        shutil.rmtree(folder, ignore_errors=True)
        subprocess.run([blockffn, "init", *args, "-o", str(folder)], check=True)  # bf16, like init's default
        with tempfile.TemporaryDirectory() as tmp:  # the official files beside config.json, as README says
            shutil.copytree(folder, tmp, dirs_exist_ok=True)
            for f in OFFICIAL_FILES:
                shutil.copy(official / f, Path(tmp) / f)
            model = AutoModelForCausalLM.from_pretrained(tmp, trust_remote_code=True, torch_dtype=torch.float32,
                                                         attn_implementation="eager")
            logits, tokens = official_outputs(model)
        # The test re-runs the same `blockffn init` and checks it writes these very bytes, so only the digest is kept.
        digest = init_digest(folder)
        for f in folder.iterdir():
            f.unlink()
        np.savez_compressed(folder / "golden.npz", prompt=np.array(PROMPT), logits=logits, greedy=tokens,
                            init_args=np.array(args), init_sha256=np.array(digest))
        print(f"{name}: official code loaded it; logits {logits.shape}; init output sha256 {digest[:12]}")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([blockffn, "init", "--preset", "3b", "--layers", "1", "-o", f"{tmp}/m"], check=True,
                       capture_output=True)
        for f in OFFICIAL_FILES:
            shutil.copy(official / f, Path(tmp) / "m" / f)
        cfg = json.loads((Path(tmp) / "m" / "config.json").read_text())
        print(f"init --preset 3b: attention_type={cfg['attention_type']!r}; engine reads {engine_config_reader(Path(tmp) / 'm')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", type=Path, required=True, help="folder with the official bmt_to_hf/*.py")
    ap.add_argument("--blockffn", default="blockffn", help="our CLI, for the ours -> official direction")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/fixtures/official")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    official_to_ours(args.official, args.out)
    ours_to_official(args.official, args.blockffn, args.out)


if __name__ == "__main__":
    main()
