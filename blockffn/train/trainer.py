"""`blockffn train`: LM loss + activation-locality + adaptive chunk-sparsification, µP, DDP, HF checkpoints.

Total loss (research/blockffn.md §4.1):  L = L_lm + λ_al·AL + λ_cs(t)·CS.
Runs on one process (CPU or GPU), or under ``torchrun --nproc_per_node N`` (gloo on CPU, nccl with one GPU per
rank): each rank draws its own windows of ``batch_size``, so the global batch is ``batch_size × N``; gradients are
averaged by DDP, rank 0 evaluates, logs and writes checkpoints.
Checkpoints are official-format model folders (``OUTPUT/checkpoint``) plus ``trainer_state.pt`` holding only
tensors and plain numbers (loaded with ``weights_only=True``).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from blockffn.data.prepare import load_split
from blockffn.errors import CheckpointError, DataError
from blockffn.model.checkpoint import load_model, save_model
from blockffn.model.config import BlockFFNConfig
from blockffn.model.modeling import BlockFFNForCausalLM
from blockffn.outputs import CLAIM, OutputError
from blockffn.train.device import autocast, to_device, training_device
from blockffn.train.evaluate import evaluate, window_batch
from blockffn.train.lambda_scheduler import AdaptiveLambda
from blockffn.train.losses import activation_locality_loss, chunk_sparsity_loss
from blockffn.train.metrics import per_layer_json


@dataclass
class TrainConfig:
    data_dir: str
    output_dir: str
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 1e-2
    mup: bool = True  # matrices at lr·dim_model_base/d (µP); embeddings, head, norms at lr
    warmup_steps: int = 50
    decay_frac: float = 0.2  # WSD: final fraction of steps decays the lr linearly to min_lr_frac·lr
    min_lr_frac: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    lambda_al: float = 2e-3
    lambda_cs: float = 5e-2
    chunk_len: int = 64
    cs_stable_steps: int = 1000
    cs_adjust_every: int = 100
    eval_every: int = 200
    eval_tokens: int = 65536
    save_every: int = 500
    time_budget: float | None = None  # seconds; stops early (and decays the lr over the budget) when set
    autocast: str = "auto"  # auto (bf16 on a GPU, none on the CPU) | none | bf16
    device: str = "auto"  # auto | cpu | cuda (see train/device.py)
    seed: int = 0
    threads: int | None = None


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_distributed(device: torch.device | None = None) -> tuple[int, int]:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1): nccl between GPUs, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        gpu = device is not None and device.type == "cuda"
        dist.init_process_group("nccl" if gpu else "gloo", device_id=device if gpu else None)
    return _dist_info()


def param_groups(model: BlockFFNForCausalLM, lr: float, weight_decay: float, mup: bool) -> list[dict]:
    """µP groups (research/blockffn.md §4.5): every matrix (attention, experts, router) and router_norm at
    lr/(d/dim_model_base); embedding, lm_head and block/latent norms at lr.  No weight decay on norms."""
    cfg = model.config
    width_mult = cfg.hidden_size / cfg.dim_model_base if mup else 1.0
    groups = {"matrix": [], "embed": [], "norm": []}
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if "embed_tokens" in name or name.startswith("lm_head"):
            groups["embed"].append(p)
        elif name.endswith("router_norm.weight") or p.ndim == 2:
            groups["matrix"].append(p)
        else:
            groups["norm"].append(p)
    return [
        {"params": groups["matrix"], "lr": lr / width_mult, "base_lr": lr / width_mult, "weight_decay": weight_decay},
        {"params": groups["embed"], "lr": lr, "base_lr": lr, "weight_decay": weight_decay},
        {"params": groups["norm"], "lr": lr, "base_lr": lr, "weight_decay": 0.0},
    ]


def lr_factor(progress: float, step: int, tc: TrainConfig) -> float:
    """Warmup-stable-decay: linear warmup, constant, then linear decay over the last ``decay_frac``."""
    if step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    if tc.decay_frac <= 0 or progress < 1 - tc.decay_frac:
        return 1.0
    t = min(1.0, (progress - (1 - tc.decay_frac)) / tc.decay_frac)
    return 1.0 - (1 - tc.min_lr_frac) * t


class Trainer:
    def __init__(self, tc: TrainConfig, model_config: BlockFFNConfig | None = None, log=print, progress=None):
        self.tc = tc
        self.log = log
        if Path(tc.output_dir).exists() and not Path(tc.output_dir).is_dir():
            raise OutputError(f"{tc.output_dir}: exists and is not a folder (give a folder for the run)")
        self.device = training_device(tc.device)
        self.rank, self.world = setup_distributed(self.device)
        if tc.threads:
            torch.set_num_threads(tc.threads)
        torch.manual_seed(tc.seed)
        self.train_split = load_split(tc.data_dir, "train")
        self.val_split = load_split(tc.data_dir, "val")
        meta_path = Path(tc.data_dir) / "meta.json"
        self.meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if len(self.train_split.tokens) <= tc.seq_len + 1:
            raise DataError(f"{tc.data_dir}: training split has {len(self.train_split.tokens)} tokens; need more "
                            f"than --seq-len {tc.seq_len}")
        self.out = Path(tc.output_dir)
        self.ckpt_dir = self.out / "checkpoint"
        self.state = {"step": 0, "tokens": 0, "elapsed": 0.0}
        resume = self._has_checkpoint()
        if resume:
            self.model = load_model(self.ckpt_dir, dtype="float32").train()
            self.log(f"resuming from {self.ckpt_dir}")
        else:
            if model_config is None:
                raise ValueError("model_config is required when not resuming")
            vocab = self.meta.get("vocab_size")
            if vocab is not None and model_config.vocab_size < vocab:
                raise DataError(f"model vocab_size {model_config.vocab_size} < tokenizer vocab {vocab}")
            self.model = BlockFFNForCausalLM(model_config).init_weights(tc.seed).train()
        self.model.to(self.device)
        self.cfg = self.model.config
        self.ddp = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.opt = torch.optim.AdamW(param_groups(self.model, tc.lr, tc.weight_decay, tc.mup), betas=(0.9, 0.95),
                                     eps=1e-8)
        self.lambda_cs = AdaptiveLambda(tc.lambda_cs, tc.cs_stable_steps, tc.cs_adjust_every)
        if resume:
            st = torch.load(self.ckpt_dir / "trainer_state.pt", weights_only=True, map_location=self.device)
            self.opt.load_state_dict(st["optimizer"])
            self.lambda_cs.load_state_dict(st["lambda_cs"])
            self.state = st["state"]
        self.history = self._previous_history() if resume else []  # history.jsonl is extended, never cut short
        self.new_steps = len(self.history)
        self.progress = progress

    def _has_checkpoint(self) -> bool:
        """Whether OUTPUT/checkpoint holds a complete checkpoint; one without its trainer state is refused (a silent
        restart would replace the trained model with a fresh one)."""
        if not self.ckpt_dir.is_dir() or not any(p.name != CLAIM for p in self.ckpt_dir.iterdir()):
            return False
        if not (self.ckpt_dir / "trainer_state.pt").is_file():
            raise CheckpointError(f"{self.ckpt_dir}: incomplete checkpoint (no trainer_state.pt), so training cannot "
                                  f"resume; restore it, or move the folder away to start over")
        return True

    def _previous_history(self) -> list[dict]:
        """The history of the steps up to the checkpoint (later lines belong to steps that will be run again)."""
        path = self.out / "history.jsonl"
        if not path.is_file():
            return []
        try:
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: malformed (not one JSON object per line); move it away to resume") from None
        return [r for r in records if isinstance(r, dict) and r.get("step", 0) <= self.state["step"]]

    def _write_history(self) -> None:
        path = self.out / "history.jsonl"
        tmp = path.with_name(f".history.jsonl.tmp-{os.getpid()}")
        self.out.mkdir(parents=True, exist_ok=True)
        tmp.write_text("".join(json.dumps(h) + "\n" for h in self.history))
        os.replace(tmp, path)

    # ---------------------------------------------------------------------------------------------- batches
    def sample_batch(self, step: int) -> dict:
        rng = np.random.default_rng([self.tc.seed, self.rank, step])
        hi = len(self.train_split.tokens) - self.tc.seq_len - 1
        starts = rng.integers(0, hi, size=self.tc.batch_size)
        return to_device(window_batch(self.train_split, starts, self.tc.seq_len), self.device)

    def compute_losses(self, batch: dict) -> dict:
        tc = self.tc
        with autocast(self.device, tc.autocast):
            out = self.ddp(batch["input_ids"], positions=batch["positions"], doc_ids=batch["doc_ids"])
        lm = F.cross_entropy(out.logits.float().flatten(0, 1), batch["labels"].flatten())
        al = activation_locality_loss(out.router_logits, batch["doc_pos"]) if tc.lambda_al > 0 else lm.new_zeros(())
        cs = chunk_sparsity_loss(out.router_logits, batch["doc_pos"], tc.chunk_len)
        return {"lm": lm, "al": al, "cs": cs, "router_logits": out.router_logits}

    # ---------------------------------------------------------------------------------------------- loop
    def train(self) -> dict:
        tc = self.tc
        start_time = time.time() - self.state["elapsed"]
        last_eval = None
        step = self.state["step"]
        while step < tc.steps:
            elapsed = time.time() - start_time
            if tc.time_budget is not None and elapsed >= tc.time_budget:
                self.log(f"time budget of {tc.time_budget:.0f}s reached at step {step}")
                break
            progress = step / tc.steps
            if tc.time_budget is not None:
                progress = max(progress, elapsed / tc.time_budget)
            factor = lr_factor(progress, step, tc)
            for g in self.opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            batch = self.sample_batch(step)
            losses = self.compute_losses(batch)
            lam_cs = self.lambda_cs.value if tc.lambda_cs > 0 else 0.0
            total = losses["lm"] + tc.lambda_al * losses["al"] + lam_cs * losses["cs"]
            self.opt.zero_grad(set_to_none=True)
            total.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
            self.opt.step()
            cs_value = losses["cs"].detach()
            lm_value = losses["lm"].detach()
            if self.world > 1:
                red = torch.stack([cs_value, lm_value])
                dist.all_reduce(red)
                cs_value, lm_value = red[0] / self.world, red[1] / self.world
            if tc.lambda_cs > 0:
                self.lambda_cs.step(cs_value.item())
            step += 1
            self.state.update(step=step, tokens=self.state["tokens"] + tc.batch_size * tc.seq_len * self.world,
                              elapsed=time.time() - start_time)
            rec = {"step": step, "lm": lm_value.item(), "al": losses["al"].item(), "cs": cs_value.item(),
                   "lambda_cs": lam_cs, "lr": self.opt.param_groups[1]["lr"], "grad_norm": float(gnorm),
                   "elapsed": self.state["elapsed"]}
            self.history.append(rec)
            if self.progress is not None and self.rank == 0:
                self.progress(rec)
            if self.rank == 0 and (step % tc.eval_every == 0 or step == tc.steps):
                last_eval = self.run_eval(step)
            if self.rank == 0 and tc.save_every and step % tc.save_every == 0 and step < tc.steps:
                self.save_checkpoint()
        if self.rank == 0:
            if last_eval is None or last_eval["step"] != step:
                last_eval = self.run_eval(step)
            self.save_final(last_eval)
        if self.world > 1:
            dist.barrier()
        return {"step": step, "eval": last_eval, "history": self.history[self.new_steps:], "state": dict(self.state)}

    def run_eval(self, step: int) -> dict:
        bpt = self.meta.get("val_bytes_per_token")
        r = evaluate(self.model, self.val_split, self.tc.seq_len, self.tc.eval_tokens, bytes_per_token=bpt)
        r["per_layer"] = per_layer_json(r["per_layer"])
        r["step"] = step
        self.log(f"step {step}: val loss {r['loss']:.4f} ppl {r['ppl']:.2f} TLS {r['tls']:.3f} "
                 f"CLS8 {r['cls']['8']:.3f} reuse {r['reuse']:.3f} λ_cs {self.lambda_cs.value:.4f} "
                 f"({self.state['elapsed']:.0f}s, {self.state['tokens']} tokens)")
        return r

    def _trainer_state(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "lambda_cs": self.lambda_cs.state_dict(),
                "state": dict(self.state)}

    def save_checkpoint(self) -> None:
        """Weights and trainer state appear together (one rename), then the history up to this step."""
        state = self._trainer_state()
        save_model(self.model, self.ckpt_dir, dtype="float32", tokenizer_dir=self.tc.data_dir, overwrite=True,
                   also=lambda tmp: torch.save(state, tmp / "trainer_state.pt"))
        self._write_history()

    def save_final(self, final_eval: dict) -> None:
        """The trained model (fp32, official format, tokenizer included) in OUTPUT, plus the resumable checkpoint."""
        summary = {"train_config": asdict(self.tc), "final_eval": final_eval, "state": self.state,
                   "lambda_cs_final": self.lambda_cs.value}
        self.save_checkpoint()
        self.out.mkdir(parents=True, exist_ok=True)
        final = self.out / "model"
        save_model(self.model, final, dtype="float32", tokenizer_dir=self.tc.data_dir, overwrite=True,
                   extra_files={"training_summary.json": json.dumps(summary, indent=2, default=float) + "\n"})


def num_tokens_per_second(history: list[dict], tokens_per_step: int) -> float:
    if len(history) < 2:
        return math.nan
    dt = history[-1]["elapsed"] - history[0]["elapsed"]
    return (len(history) - 1) * tokens_per_step / dt if dt > 0 else math.nan
