"""The `blockffn chat` REPL: streamed replies, /reset, /stats, /exit; Ctrl-C stops the reply being generated."""

from __future__ import annotations

import dataclasses
import io
import signal
import sys

from blockffn.runtime.session import Conversation

HELP = "commands: /reset (new conversation), /stats (speeds of the last reply and the session), /exit"


class ChatSession:
    def __init__(self, generator, params, out=None, inp=None):
        self.gen, self.out = generator, out or sys.stdout
        # undecodable input bytes become U+FFFD instead of ending the chat with a UnicodeDecodeError
        self.inp = inp or io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")
        self.conv = Conversation(generator.engine.art.chat_config.get("conv_template", {}))
        self.params = dataclasses.replace(
            params, stop=tuple(params.stop) + self.conv.stop_strings,
            stop_token_ids=tuple(params.stop_token_ids) + self.conv.stop_token_ids)
        self.last = None
        self.totals = {"replies": 0, "tokens": 0, "decode_s": 0.0, "prompt_tokens": 0, "prefill_s": 0.0}
        self._interrupted = False

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def _readline(self) -> str | None:
        self._write(">>> ")
        line = self.inp.readline()
        return None if line == "" else line.rstrip("\n")

    def repl(self) -> None:
        m = self.gen.engine.art.manifest
        self._write(f"blockffn chat — {m['target']['name']} {m['quantization']}, speculative "
                    f"{self.gen.spec.mode}. {HELP}\n")
        while True:
            try:
                line = self._readline()
            except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt
                self._write("\n")
                continue
            if line is None or line.strip() == "/exit":
                self._write("\n" if line is None else "")
                return
            cmd = line.strip()
            if not cmd:
                continue
            if cmd == "/reset":
                self.conv.reset()
                self._write("(conversation cleared)\n")
            elif cmd == "/stats":
                self._write(self.stats() + "\n")
            elif cmd.startswith("/"):
                self._write(f"unknown command {cmd}; {HELP}\n")
            else:
                self.reply(line)

    def reply(self, message: str) -> None:
        from blockffn.errors import BlockFFNError

        ids = self.gen.engine.tokenizer.encode(self.conv.prompt(message)).ids
        room = self.gen.engine.context_window - self.params.max_tokens - self.gen.spec.tree_size
        while len(ids) > room and self.conv.turns:  # forget the oldest turns first
            self.conv.turns.pop(0)
            ids = self.gen.engine.tokenizer.encode(self.conv.prompt(message)).ids
        self._interrupted = False
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            r = self.gen.generate(ids, self.params, on_text=self._write, interrupted=lambda: self._interrupted)
        except BlockFFNError as e:
            self._write(f"error: {e}\n")
            return
        except KeyboardInterrupt:  # Ctrl-C before the handler took over
            self._write("\n[stopped]\n")
            return
        finally:
            signal.signal(signal.SIGINT, previous)
        self._write("\n" + ("[stopped]\n" if r.stop_reason == "interrupted" else ""))
        self.conv.record(message, r.text)
        self.last = r
        t = self.totals
        t["replies"] += 1
        t["tokens"] += len(r.tokens)
        t["decode_s"] += r.decode_s
        t["prompt_tokens"] += r.n_prompt
        t["prefill_s"] += r.prefill_s

    def _on_sigint(self, *_):
        self._interrupted = True

    def stats(self) -> str:
        if self.last is None:
            return "no reply yet"
        r, t = self.last, self.totals
        spec = (f", {r.mean_accepted:.2f} tokens per verify over {len(r.accepted)} rounds, {r.plain_steps} plain "
                f"steps" if r.accepted else "")
        return (f"last reply: {len(r.tokens)} tokens, decode {r.tok_per_s:.1f} tok/s, prefill "
                f"{r.prefill_tok_per_s:.1f} tok/s ({r.n_prompt} prompt tokens), speculative {self.gen.spec.mode}"
                f"{spec}, stop: {r.stop_reason}\nsession: {t['replies']} replies, {t['tokens']} tokens, decode "
                f"{t['tokens'] / max(t['decode_s'], 1e-9):.1f} tok/s")
