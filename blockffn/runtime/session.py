"""What `generate`, `chat` and `bench` share: open an artifact and its draft, and the conversation template.

``--draft`` resolution: a folder with ``blockffn-draft.json`` is an EAGLE head library; a folder with a
``blockffn-manifest.json`` is a separate (smaller) model artifact used for chain drafts; no flag means the EAGLE
draft built into ``ARTIFACT/draft`` when there is one.
"""

from __future__ import annotations

from pathlib import Path

from blockffn.errors import BlockFFNError
from blockffn.validation import OptionError


def open_drafter(option, engine, device: str):
    from blockffn.artifacts.layout import MANIFEST
    from blockffn.artifacts.layout import DRAFT_FOLDER, DRAFT_MANIFEST
    from blockffn.runtime.draft import EagleDraft, ModelDraft
    from blockffn.runtime.engine import Engine

    if option is None:
        built_in = engine.art.path / DRAFT_FOLDER
        return EagleDraft(built_in, engine) if (built_in / DRAFT_MANIFEST).exists() else None
    path = Path(option)
    if (path / DRAFT_MANIFEST).exists():
        return EagleDraft(path, engine)
    if (path / MANIFEST).exists():
        return ModelDraft(Engine(path, device=device), engine)
    raise BlockFFNError(f"--draft {path}: neither an EAGLE draft library (blockffn-draft.json) nor a compiled model "
                        f"artifact (blockffn-manifest.json)")


def resolve_mode(mode: str, drafter) -> str:
    """``auto``: chains or EAGLE-2 trees (whichever measures faster) with an EAGLE draft, chains with a draft
    model, plain decoding without a draft."""
    if mode != "auto":
        return mode
    if drafter is None:
        return "off"
    return "auto" if drafter.kind == "eagle" else "chain"


def open_generator(artifact, device: str = "cpu", draft=None, speculative: str = "auto", draft_len: int = 0,
                   ffn: str = "auto", adaptive: bool = True, model_lib=None):
    from blockffn.runtime.engine import Engine
    from blockffn.runtime.generation import Generator, SpecConfig

    engine = Engine(artifact, device=device, ffn=ffn, model_lib=model_lib)
    longest = min(engine.context_window, engine.prefill_chunk) - 1  # one verify call holds the chain + 1 token
    if draft_len > longest:
        raise OptionError(f"--draft-len {draft_len} is beyond what one verify call of {artifact} holds (at most "
                          f"{longest}: context window {engine.context_window}, prefill chunk {engine.prefill_chunk})")
    drafter = open_drafter(draft, engine, device) if speculative != "off" else None
    mode = resolve_mode(speculative, drafter)
    if mode != "off" and drafter is None:
        raise BlockFFNError(f"--speculative {mode} needs a draft: {artifact} has no draft/ folder (compile a model "
                            f"that has MODEL/draft, or pass --draft DIR)")
    spec = SpecConfig(mode=mode, chain_len=draft_len, adaptive=adaptive)
    return Generator(engine, drafter, spec)


class Conversation:
    """Prompts from ``mlc-chat-config.json``'s ``conv_template`` (MLC's fields): system, role templates, seps."""

    def __init__(self, template: dict):
        self.t = template
        self.turns: list[tuple[str, str]] = []

    def reset(self) -> None:
        self.turns = []

    def prompt(self, user_message: str) -> str:
        t = self.t
        seps = t.get("seps") or [""]
        parts = [t.get("system_template", "{system_message}").replace("{system_message}",
                                                                      t.get("system_message", ""))]
        roles, templates = t.get("roles", {}), t.get("role_templates", {})

        def turn(role: str, text: str, i: int) -> str:
            body = templates.get(role, "{%s_message}" % role).replace("{%s_message}" % role, text)
            return roles.get(role, "") + t.get("role_content_sep", "") + body + seps[i % len(seps)]

        for i, (user, reply) in enumerate(self.turns):
            parts.append(turn("user", user, 0))
            parts.append(turn("assistant", reply, 1))
        body = templates.get("user", "{user_message}").replace("{user_message}", user_message)
        parts.append(roles.get("user", "") + t.get("role_content_sep", "") + body)
        if roles.get("assistant"):
            parts.append(seps[0] + roles["assistant"] + t.get("role_empty_sep", ""))
        return "".join(p for p in parts if p)

    def record(self, user_message: str, reply: str) -> None:
        self.turns.append((user_message, reply))

    @property
    def stop_strings(self) -> tuple:
        return tuple(self.t.get("stop_str") or ())

    @property
    def stop_token_ids(self) -> tuple:
        return tuple(self.t.get("stop_token_ids") or ())
