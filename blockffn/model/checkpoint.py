"""Read and write BlockFFN checkpoints in the official Hugging Face layout.

A model folder holds ``config.json``, weights as ``model.safetensors`` or shards plus
``model.safetensors.index.json``, and optionally ``tokenizer.json`` / ``tokenizer_config.json``.  Loading checks
every tensor against the names and shapes the config implies, so a checkpoint that disagrees with its config
fails with one line naming the tensor.  Pickle is never used: ``pytorch_model.bin`` is read with
``torch.load(weights_only=True)``, which cannot execute code.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from blockffn.errors import CheckpointError
from blockffn.model.config import BlockFFNConfig
from blockffn.model.modeling import BlockFFNForCausalLM
from blockffn.outputs import atomic_output_dir

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise CheckpointError(f"unknown dtype {name!r}; choose one of float32, float16, bfloat16") from None


def expected_shapes(cfg: BlockFFNConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the official checkpoint with its shape, derived from the config alone."""
    d, E, De, V = cfg.hidden_size, cfg.num_experts, cfg.expert_size, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, d)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        if cfg.attention_type == "mla":
            h, nope, rope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
            shapes[p + "self_attn.q_a_proj.weight"] = (cfg.q_lora_rank, d)
            shapes[p + "self_attn.q_a_layernorm.weight"] = (cfg.q_lora_rank,)
            shapes[p + "self_attn.q_b_proj.weight"] = (h * (nope + rope), cfg.q_lora_rank)
            shapes[p + "self_attn.kv_a_proj_with_mqa.weight"] = (cfg.kv_lora_rank + rope, d)
            shapes[p + "self_attn.kv_a_layernorm.weight"] = (cfg.kv_lora_rank,)
            shapes[p + "self_attn.kv_b_proj.weight"] = (h * (nope + v), cfg.kv_lora_rank)
            shapes[p + "self_attn.o_proj.weight"] = (d, h * v)
        else:
            h, kvh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.gqa_head_dim
            shapes[p + "self_attn.q_proj.weight"] = (h * hd, d)
            shapes[p + "self_attn.k_proj.weight"] = (kvh * hd, d)
            shapes[p + "self_attn.v_proj.weight"] = (kvh * hd, d)
            shapes[p + "self_attn.o_proj.weight"] = (d, h * hd)
        shapes[p + "mlp.router_proj.weight"] = (E, d)
        shapes[p + "mlp.router_norm.weight"] = (E,)
        shapes[p + "mlp.up_proj"] = (E * De, d)
        shapes[p + "mlp.down_proj"] = (d, E * De)
    return shapes


def official_layout(name: str, t: torch.Tensor, cfg: BlockFFNConfig):
    """Yield ``(name, tensor)`` in our layout for one stored tensor of any layout the official code loads.

    Two official variants differ from ours: the 2.8B engine's fused ``qkv_proj`` (split into q/k/v), and
    ``ffn_type: "block"`` 3-D experts (``up_proj [E, De, d]``, ``down_proj [E, d, De]``; reshaped to the
    ``block_linear`` ``[E·De, d]`` / ``[d, E·De]`` matrices, expert e = rows / columns ``e·De:(e+1)·De``).
    Works one tensor at a time so streaming readers can use it.
    """
    E, De, d = cfg.num_experts, cfg.expert_size, cfg.hidden_size
    if name.endswith("self_attn.qkv_proj.weight") and cfg.attention_type == "vanilla":
        h, kvh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.gqa_head_dim
        if t.shape[0] != (h + 2 * kvh) * hd:
            raise CheckpointError(f"{name}: shape {tuple(t.shape)} does not fit {h}+2x{kvh} heads of {hd}")
        base = name[: -len("qkv_proj.weight")]
        for part, w in zip(("q_proj", "k_proj", "v_proj"), t.split([h * hd, kvh * hd, kvh * hd])):
            yield f"{base}{part}.weight", w
    elif name.endswith("mlp.up_proj") and tuple(t.shape) == (E, De, d):
        yield name, t.reshape(E * De, d)
    elif name.endswith("mlp.down_proj") and tuple(t.shape) == (E, d, De):
        yield name, t.permute(1, 0, 2).reshape(d, E * De)
    else:
        yield name, t


def to_our_layout(tensors: dict[str, torch.Tensor], cfg: BlockFFNConfig) -> dict[str, torch.Tensor]:
    return {n: w for name, t in tensors.items() for n, w in official_layout(name, t, cfg)}


def check_tensors(tensors: dict[str, torch.Tensor], cfg: BlockFFNConfig, source: str) -> None:
    # some exporters write a tied head explicitly; it is dropped on load
    ignore = ("lm_head.weight",) if cfg.tie_word_embeddings else ()
    check_named_shapes(tensors, expected_shapes(cfg), source, ignore=ignore)
    for name, t in tensors.items():
        check_finite(name, t, source)


def check_finite(name: str, t: torch.Tensor, source: str) -> None:
    """A NaN or infinite weight (a diverged run, a corrupted file) would make every output NaN: refuse it at load,
    naming the tensor, instead of generating garbage or failing deep inside sampling."""
    if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"{source}: tensor '{name}' holds {bad} NaN or infinite value(s) (a diverged or "
                              f"corrupted checkpoint)")


def check_named_shapes(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: str,
                       ignore: tuple[str, ...] = (), integer: tuple[str, ...] = ()) -> None:
    """Exactly the ``expected`` names (plus ``ignore``d extras) with those shapes; float unless in ``integer``."""
    missing = [n for n in expected if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: missing tensor '{missing[0]}'{more}")
    extra = [n for n in tensors if n not in expected and n not in ignore]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{source}: unexpected tensor '{extra[0]}'{more} for this config.json")
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            raise CheckpointError(f"{source}: tensor '{name}' has shape {list(got)} but config.json implies "
                                  f"{list(shape)}")
        if tensors[name].is_floating_point() == (name in integer):
            kind = "an integer" if name in integer else "a float"
            raise CheckpointError(f"{source}: tensor '{name}' has dtype {tensors[name].dtype}; expected {kind} "
                                  f"tensor")


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All weight tensors of a model folder (single or sharded safetensors, or pickle-free ``.bin``)."""
    folder = Path(folder)
    try:
        if (folder / SAFE_INDEX).exists():
            return _read_index(folder, SAFE_INDEX, _read_safetensors)
        if (folder / "model.safetensors").exists():
            return _read_safetensors(folder / "model.safetensors")
        singles = sorted(folder.glob("*.safetensors"))
        if len(singles) == 1:
            return _read_safetensors(singles[0])
        if (folder / BIN_INDEX).exists():
            return _read_index(folder, BIN_INDEX, _read_bin)
        if (folder / "pytorch_model.bin").exists():
            return _read_bin(folder / "pytorch_model.bin")
    except CheckpointError:
        raise
    pts = sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth")) + sorted(folder.glob("*.ckpt"))
    if pts:
        raise CheckpointError(
            f"{pts[0]}: raw pickle checkpoints are refused; convert it once in a trusted Python with "
            f"`safetensors.torch.save_file(torch.load(path, weights_only=True), '{folder}/model.safetensors')`")
    raise CheckpointError(f"{folder}: no model.safetensors, {SAFE_INDEX} or pytorch_model.bin found")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # torch raises UnpicklingError/RuntimeError variants
        raise CheckpointError(f"{path}: cannot be read safely with weights_only=True ({type(e).__name__}); "
                              f"convert it to safetensors in a trusted environment") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a flat state dict of tensors")
    return obj


def _read_index(folder: Path, index_name: str, reader) -> dict[str, torch.Tensor]:
    try:
        index = json.loads((folder / index_name).read_text())
        weight_map = index["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder / index_name}: malformed index ({e})") from None
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        path = folder / shard
        if not path.exists():
            raise CheckpointError(f"{path}: shard listed in {index_name} is missing")
        part = reader(path)
        for name, t in part.items():
            if weight_map.get(name) != shard:
                raise CheckpointError(f"{path}: tensor '{name}' is not listed for this shard in {index_name}")
            tensors[name] = t
    listed_missing = [n for n in weight_map if n not in tensors]
    if listed_missing:
        raise CheckpointError(f"{folder / index_name}: tensor '{listed_missing[0]}' is listed but in no shard")
    return tensors


def load_model(folder: str | Path, dtype: str | torch.dtype | None = "float32") -> BlockFFNForCausalLM:
    """Load a model folder; ``dtype=None`` keeps the stored dtype of each tensor's first occurrence."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a model folder")
    cfg = BlockFFNConfig.load(folder / "config.json")
    tensors = to_our_layout(read_tensors(folder), cfg)
    check_tensors(tensors, cfg, str(folder))
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    target = resolve_dtype(dtype) if dtype is not None else next(iter(tensors.values())).dtype
    with torch.device("meta"):
        model = BlockFFNForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(target)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.load_state_dict({k: v.to(target) for k, v in tensors.items()}, strict=not cfg.tie_word_embeddings)
    return model.eval()


def state_dict_for_save(model: BlockFFNForCausalLM) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().cpu() for k, v in sd.items()}


def save_model(model: BlockFFNForCausalLM, folder: str | Path, dtype: str | torch.dtype = "bfloat16",
               max_shard_bytes: int | None = None, tokenizer_dir: str | Path | None = None,
               extra_files: dict[str, str] | None = None, overwrite: bool = False, also=None) -> Path:
    """Write an official-format model folder atomically (temp folder, then rename); ``also(tmp)`` may add files
    that must appear together with the weights (a trainer's state)."""
    folder = Path(folder)
    dt = resolve_dtype(dtype)
    cfg = model.config.replace(torch_dtype={torch.float32: "float32", torch.float16: "float16",
                                            torch.bfloat16: "bfloat16"}[dt])
    tensors = state_dict_for_save(model)
    with atomic_output_dir(folder, overwrite=overwrite) as tmp:
        cfg.save(tmp / "config.json")
        write_safetensors(tensors, tmp, max_shard_bytes, dtype=dt)
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if also is not None:
            also(tmp)
    return folder


def write_safetensors(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int | None,
                      dtype: torch.dtype | None = None) -> None:
    """Write ``tensors`` (cast to ``dtype`` one shard at a time, so a model is never held twice) as
    ``model.safetensors`` or as shards of at most ``max_shard_bytes`` plus their index."""
    meta = {"format": "pt"}
    itemsize = {n: (torch.empty((), dtype=dtype) if dtype else t).element_size() for n, t in tensors.items()}
    nbytes = {n: t.numel() * itemsize[n] for n, t in tensors.items()}
    total = sum(nbytes.values())

    def cast(names):
        return {n: (tensors[n].to(dtype) if dtype else tensors[n]).contiguous() for n in names}

    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(cast(tensors), str(folder / "model.safetensors"), metadata=meta)
        return
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        if shards[-1] and size + nbytes[name] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(cast(names), str(folder / fname), metadata=meta)
        weight_map.update({n: fname for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def copy_tokenizer(src: str | Path, dst: Path) -> None:
    src = Path(src)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def checkpoint_sha256(folder: str | Path) -> str:
    """A digest of config + weight files, recorded by artifacts to name their source."""
    folder = Path(folder)
    h = hashlib.sha256()
    names = sorted(p.name for p in folder.iterdir()
                   if p.name == "config.json" or p.suffix in (".safetensors", ".bin") or p.name.endswith("index.json"))
    for name in names:
        h.update(name.encode())
        with open(folder / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
