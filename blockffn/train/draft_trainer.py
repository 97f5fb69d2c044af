"""`blockffn train-draft`: fit an EAGLE draft head to a frozen target's features (research/blockffn.md §5.2).

Teacher features come from the target on the fly: for a window of tokens x_0..x_T the target gives final-norm
hidden states h_j and next-token distributions p_j.  Draft slot j reads (h_j, x_{j+1}) and is trained, as in EAGLE,
with ``L = w_v · SmoothL1(f_j, h_{j+1}) + w_p · CE(p_{j+1}, softmax(draft logits_j))`` — feature regression plus
cross-entropy against the target's next-token distribution (restricted to the draft vocabulary).  Slots whose
token starts a new packed document are masked out.  The target, its embedding and its LM head stay frozen.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from blockffn.data.prepare import PackedSplit, load_tokenizer, pack, read_documents
from blockffn.errors import DataError
from blockffn.model.checkpoint import load_model
from blockffn.model.draft import DraftConfig, EagleDraftHead, save_draft
from blockffn.train.device import to_device, training_device
from blockffn.train.evaluate import eval_windows, window_batch
from blockffn.train.trainer import lr_factor


@dataclass
class DraftTrainConfig:
    target_model: str
    texts: list[str]
    output_dir: str
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    warmup_steps: int = 50
    decay_frac: float = 0.2  # WSD, as trainer.lr_factor
    min_lr_frac: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    v_weight: float = 1.0  # EAGLE's weights of the regression and classification terms
    p_weight: float = 0.1
    holdout_fraction: float = 0.02  # tail of every file's documents, left out (the split `data prepare` holds out)
    draft_vocab_size: int | None = None  # None: the full target vocabulary
    time_budget: float | None = None  # seconds
    eval_tokens: int = 16384
    dtype: str = "float32"
    overwrite: bool = False
    seed: int = 0
    threads: int | None = None
    device: str = "auto"  # auto | cpu | cuda (see train/device.py)


def tokenize_texts(paths: list[str], tok, eos_id: int, holdout_fraction: float) -> tuple[PackedSplit, PackedSplit]:
    """(train, held-out) packed splits; the held-out part is the last ``holdout_fraction`` of each file's documents,
    the same cut `blockffn data prepare --val-fraction` makes, so a model's own validation text stays unseen."""
    train_ids, val_ids = [], []
    for path in paths:
        docs = read_documents(Path(path))
        if not docs:
            raise DataError(f"{path}: no text found")
        n_val = max(1, round(len(docs) * holdout_fraction)) if holdout_fraction > 0 and len(docs) > 1 else 0
        enc = [e.ids for e in tok.encode_batch(docs)]
        train_ids += enc[: len(enc) - n_val]
        val_ids += enc[len(enc) - n_val:]
    return pack(train_ids, eos_id), pack(val_ids or train_ids[-1:], eos_id)


def frequency_ranked_vocab(tokens: np.ndarray, vocab_size: int, size: int) -> torch.Tensor:
    """FR-Spec's sub-vocabulary: the ``size`` most frequent target ids (ties by id), most frequent first."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size)
    order = np.argsort(-counts, kind="stable")[:size]
    return torch.from_numpy(order.astype(np.int64))


def draft_losses(draft: EagleDraftHead, target, batch: dict) -> dict:
    """EAGLE losses and top-1 agreement for one window batch (see the module docstring)."""
    with torch.no_grad():
        out = target(batch["input_ids"], positions=batch["positions"], doc_ids=batch["doc_ids"])
    h, logits_t = out.hidden, out.logits
    ids, docs = batch["input_ids"], batch["doc_ids"]
    valid = (docs[:, 1:] == docs[:, :-1]).float()  # slot j pairs h_j with x_{j+1}: same document only
    doc_ids = docs[:, :-1]
    t = ids.shape[1] - 1
    mask = (torch.tril(torch.ones(t, t, dtype=torch.bool, device=ids.device))[None, None]
            & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :]))
    pred = draft(ids[:, 1:], h[:, :-1], positions=batch["positions"][:, :-1], mask=mask)
    n = valid.sum().clamp(min=1)
    v_loss = (F.smooth_l1_loss(pred.hidden, h[:, 1:], reduction="none").mean(-1) * valid).sum() / n
    p_target = torch.softmax(logits_t[:, 1:].float(), dim=-1)
    if draft.d2t is not None:
        p_target = p_target[..., draft.d2t]
    logq = torch.log_softmax(pred.logits.float(), dim=-1)
    p_loss = (-(p_target * logq).sum(-1) * valid).sum() / n
    agree = draft.target_token_ids(pred.logits.argmax(-1)) == logits_t[:, 1:].argmax(-1)
    acc = (agree.float() * valid).sum() / n
    return {"v": v_loss, "p": p_loss, "acc": acc}


class DraftTrainer:
    def __init__(self, tc: DraftTrainConfig, log=print, progress=None):
        self.tc, self.log, self.progress = tc, log, progress
        if tc.threads:
            torch.set_num_threads(tc.threads)
        torch.manual_seed(tc.seed)
        self.device = training_device(tc.device)
        self.target = load_model(tc.target_model, dtype="float32").eval().to(self.device)
        for p in self.target.parameters():
            p.requires_grad_(False)
        tok = load_tokenizer(tc.target_model)
        self.train_split, self.val_split = tokenize_texts(tc.texts, tok, self.target.config.eos_token_id,
                                                          tc.holdout_fraction)
        if len(self.train_split.tokens) <= tc.seq_len + 1:
            raise DataError(f"training text has {len(self.train_split.tokens)} tokens; need more than --seq-len "
                            f"{tc.seq_len}")
        cfg = DraftConfig.from_target(self.target.config, draft_vocab_size=tc.draft_vocab_size)
        self.draft = EagleDraftHead(cfg).init_weights(tc.seed)
        if cfg.reduced_vocab:
            self.draft.d2t.copy_(frequency_ranked_vocab(self.train_split.tokens, cfg.vocab_size,
                                                        cfg.draft_vocab_size))
        self.draft.to(self.device).bind_target(self.target).train()
        decay = [p for n, p in self.draft.named_parameters() if p.ndim == 2]
        other = [p for n, p in self.draft.named_parameters() if p.ndim != 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                      {"params": other, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95))
        self.history: list[dict] = []

    def sample_batch(self, step: int) -> dict:
        rng = np.random.default_rng([self.tc.seed, step])
        starts = rng.integers(0, len(self.train_split.tokens) - self.tc.seq_len - 1, size=self.tc.batch_size)
        return to_device(window_batch(self.train_split, starts, self.tc.seq_len), self.device)

    def train(self) -> dict:
        tc = self.tc
        start = time.time()
        step = 0
        while step < tc.steps:
            elapsed = time.time() - start
            if tc.time_budget is not None and elapsed >= tc.time_budget:
                self.log(f"time budget of {tc.time_budget:.0f}s reached at step {step}")
                break
            progress = step / tc.steps if tc.time_budget is None else max(step / tc.steps, elapsed / tc.time_budget)
            for g in self.opt.param_groups:
                g["lr"] = tc.lr * lr_factor(progress, step, tc)
            losses = draft_losses(self.draft, self.target, self.sample_batch(step))
            total = tc.v_weight * losses["v"] + tc.p_weight * losses["p"]
            self.opt.zero_grad(set_to_none=True)
            total.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(self.draft.parameters(), tc.grad_clip)
            self.opt.step()
            step += 1
            rec = {"step": step, "loss": total.item(), "v": losses["v"].item(), "p": losses["p"].item(),
                   "acc": losses["acc"].item(), "lr": self.opt.param_groups[0]["lr"], "grad_norm": float(gnorm),
                   "elapsed": time.time() - start}
            self.history.append(rec)
            if self.progress is not None:
                self.progress(rec)
        elapsed = time.time() - start
        final = self.evaluate()
        tokens = step * tc.batch_size * tc.seq_len
        summary = {"train_config": asdict(tc), "steps": step, "tokens": tokens, "elapsed_s": elapsed,
                   "train_tokens_available": int(len(self.train_split.tokens)), "heldout_eval": final}
        save_draft(self.draft, tc.output_dir, dtype=tc.dtype, overwrite=tc.overwrite,
                   extra_files={"training_summary.json": json.dumps(summary, indent=2, default=float) + "\n"})
        self.log(f"held-out: loss {final['loss']:.4f} (smooth-L1 {final['v']:.4f}, CE {final['p']:.4f}), "
                 f"top-1 agreement with the target {final['acc']:.3f}")
        return {"step": step, "tokens": tokens, "elapsed": elapsed, "eval": final, "history": self.history}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Teacher-forced losses and top-1 agreement on the held-out documents."""
        self.draft.eval()
        starts = eval_windows(len(self.val_split.tokens), self.tc.seq_len, self.tc.eval_tokens)
        sums, n = {"v": 0.0, "p": 0.0, "acc": 0.0}, 0
        for i in range(0, len(starts), self.tc.batch_size):
            chunk = starts[i: i + self.tc.batch_size]
            batch = to_device(window_batch(self.val_split, chunk, self.tc.seq_len), self.device)
            r = draft_losses(self.draft, self.target, batch)
            for k in sums:
                sums[k] += r[k].item() * len(chunk)
            n += len(chunk)
        self.draft.train()
        out = {k: v / max(n, 1) for k, v in sums.items()}
        out["loss"] = self.tc.v_weight * out["v"] + self.tc.p_weight * out["p"]
        out["windows"] = n
        return out
