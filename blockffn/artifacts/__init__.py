"""MLC-LLM artifact layout: mlc-chat-config.json, tensor-cache shards, tokenizer, model library, manifest."""

from blockffn.artifacts.reader import Artifact, open_artifact

__all__ = ["Artifact", "open_artifact"]
