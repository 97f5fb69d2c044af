"""`blockffn data prepare`: text/jsonl files -> byte-level BPE -> document-packed token arrays.

Output folder layout (all numpy, memory-mappable, no pickle):

* ``tokenizer.json`` / ``tokenizer_config.json`` - the trained byte-level BPE (HF ``tokenizers`` format)
* ``train.tokens.npy`` / ``val.tokens.npy`` - uint16/uint32 token ids, documents concatenated, each followed by EOS
* ``train.docs.npy`` / ``val.docs.npy`` - int64 start offset of every document (so document ids and
  document-internal positions can be recovered for any window)
* ``val.txt`` - the held-out documents as plain text (blank-line separated)
* ``meta.json`` - sources, counts, bytes per token (for bits-per-byte)

The held-out split is the last ``val_fraction`` of the documents of *every* source file (research/data.md §4),
so each source contributes to validation.
"""

from __future__ import annotations

import json
import lzma
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blockffn.errors import DataError

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, PAD]


def read_text(path: Path) -> str:
    try:
        if path.suffix == ".xz":
            with lzma.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (UnicodeDecodeError, lzma.LZMAError) as e:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({e})") from None


def read_documents(path: Path, split: str = "blank") -> list[str]:
    """Documents of one file.  ``.jsonl``: the ``text`` field of each line.  Text: blocks separated by blank lines
    (``split='blank'``), one per line (``'line'``) or the whole file (``'file'``)."""
    path = Path(path)
    name = path.name[:-3] if path.name.endswith(".xz") else path.name
    text = read_text(path)
    if name.endswith(".jsonl"):
        docs = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                docs.append(obj["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{i}: each jsonl line must be an object with a 'text' field") from None
    elif split == "blank":
        docs = text.split("\n\n")
    elif split == "line":
        docs = text.splitlines()
    elif split == "file":
        docs = [text]
    else:
        raise DataError(f"unknown document split {split!r}; use blank, line or file")
    return [d.strip() for d in docs if d.strip()]


def train_tokenizer(texts, vocab_size: int, out_dir: Path):
    """Byte-level BPE (GPT-2 style pre-tokenisation) trained with HF ``tokenizers``; saved beside the data."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    save_tokenizer(tok, out_dir)
    return tok


def save_tokenizer(tok, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    tok.save(str(out_dir / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS, "pad_token": PAD,
           "unk_token": None, "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
           "model_max_length": 4096}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def load_tokenizer(folder: Path):
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.exists():
        raise DataError(f"{path}: missing tokenizer (a model folder needs tokenizer.json)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed JSON or an unknown model
        raise DataError(f"{path}: not a valid tokenizer ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                        ) from None


@dataclass
class PackedSplit:
    tokens: np.ndarray  # [N]
    doc_starts: np.ndarray  # [D] ascending offsets, doc_starts[0] == 0

    def doc_index(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(document id, position inside the document) for tokens [start, start+length)."""
        idx = np.arange(start, start + length)
        doc = np.searchsorted(self.doc_starts, idx, side="right") - 1
        return doc, idx - self.doc_starts[doc]


def pack(docs_ids: list[list[int]], eos_id: int) -> PackedSplit:
    lengths = np.array([len(d) + 1 for d in docs_ids], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    flat = np.empty(int(lengths.sum()), dtype=np.int64)
    for s, d in zip(starts, docs_ids):
        flat[s: s + len(d)] = d
        flat[s + len(d)] = eos_id
    return PackedSplit(flat, starts)


def save_split(split: PackedSplit, out_dir: Path, name: str, vocab_size: int) -> None:
    dtype = np.uint16 if vocab_size <= 65535 else np.uint32
    np.save(out_dir / f"{name}.tokens.npy", split.tokens.astype(dtype))
    np.save(out_dir / f"{name}.docs.npy", split.doc_starts)


def load_split(data_dir: Path, name: str) -> PackedSplit:
    data_dir = Path(data_dir)
    try:
        tokens = np.load(data_dir / f"{name}.tokens.npy", mmap_mode="r", allow_pickle=False)
        docs = np.load(data_dir / f"{name}.docs.npy", allow_pickle=False)
    except FileNotFoundError as e:
        raise DataError(f"{data_dir}: not a prepared data folder ({Path(e.filename).name} missing); "
                        f"run `blockffn data prepare` first") from None
    except ValueError as e:
        raise DataError(f"{data_dir}: corrupt {name} split ({e})") from None
    if len(docs) == 0 or docs[0] != 0 or np.any(np.diff(docs) <= 0) or docs[-1] >= len(tokens):
        raise DataError(f"{data_dir}: {name}.docs.npy does not describe {name}.tokens.npy")
    return PackedSplit(np.asarray(tokens, dtype=np.int64), docs)


def prepare(inputs: list[Path], out_dir: Path, vocab_size: int = 4096, val_fraction: float = 0.02,
            doc_split: str = "blank", tokenizer_dir: Path | None = None, log=print, overwrite: bool = False) -> dict:
    """Build the prepared data folder (atomically; an existing one only with ``overwrite``).  Returns the metadata
    written to meta.json."""
    from blockffn.outputs import atomic_output_dir, check_output

    if not inputs:
        raise DataError("no input files given")
    if not 0 < val_fraction < 0.5:
        raise DataError(f"--val-fraction must be in (0, 0.5), got {val_fraction}")
    check_output(out_dir, overwrite, "data")  # before the (long) reading and tokenizer training
    sources = {}
    for path in inputs:
        docs = read_documents(Path(path), doc_split)
        if len(docs) < 2:
            raise DataError(f"{path}: needs at least 2 documents to split train/val, found {len(docs)}")
        sources[Path(path).name] = docs
    with atomic_output_dir(out_dir, overwrite=overwrite, kind="data") as tmp:
        if tokenizer_dir is not None:
            tok = load_tokenizer(tokenizer_dir)
            save_tokenizer(tok, tmp)
        else:
            log(f"training byte-level BPE, vocab {vocab_size}")
            all_docs = [d for docs in sources.values() for d in docs]
            tok = train_tokenizer(all_docs, vocab_size, tmp)
        eos_id = tok.token_to_id(EOS)
        if eos_id is None:
            raise DataError(f"tokenizer has no {EOS} token")
        train_ids, val_ids, per_source, val_docs = [], [], {}, []
        val_bytes = train_bytes = 0
        for name, docs in sources.items():
            n_val = max(1, round(len(docs) * val_fraction))
            enc = [e.ids for e in tok.encode_batch(docs)]
            train_ids += enc[:-n_val]
            val_ids += enc[-n_val:]
            val_docs += docs[-n_val:]
            train_bytes += sum(len(d.encode()) + 1 for d in docs[:-n_val])
            val_bytes += sum(len(d.encode()) + 1 for d in docs[-n_val:])
            per_source[name] = {"docs": len(docs), "val_docs": n_val, "tokens": sum(len(e) for e in enc)}
            log(f"  {name}: {len(docs)} documents, {per_source[name]['tokens']} tokens")
        train, val = pack(train_ids, eos_id), pack(val_ids, eos_id)
        vocab = tok.get_vocab_size()
        save_split(train, tmp, "train", vocab)
        save_split(val, tmp, "val", vocab)
        meta = {"vocab_size": vocab, "eos_token_id": eos_id, "pad_token_id": tok.token_to_id(PAD),
                "doc_split": doc_split, "val_fraction": val_fraction, "sources": per_source,
                "train_tokens": int(len(train.tokens)), "val_tokens": int(len(val.tokens)),
                "train_bytes": train_bytes, "val_bytes": val_bytes,
                "val_bytes_per_token": val_bytes / len(val.tokens)}
        # the held-out documents as text, so `blockffn eval --text DATA/val.txt` measures the same split
        (tmp / "val.txt").write_text("\n\n".join(val_docs) + "\n", encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
