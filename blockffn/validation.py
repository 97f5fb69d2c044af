"""What a valid numeric option is, defined once.

The CLI's option types (``Number``) and the dataclasses of the library API (``SamplingParams.__post_init__``) check
values against the same ``Range``s, so the PyTorch and the compiled-artifact paths refuse the same inputs, before
any work: NaN and infinities always (a NaN temperature or top-p samples garbage with exit 0, a NaN learning rate
trains garbage), and values outside the option's range.  A refused value is a usage error: exit code 2.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import click

from blockffn.errors import BlockFFNError


class OptionError(BlockFFNError):
    """An option value outside its range (a usage error: the CLI exits with 2)."""


@dataclass(frozen=True)
class Range:
    """Finite numbers between ``lo`` and ``hi`` (each bound inclusive unless ``*_open``); integers only when
    ``integer``."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.lo is not None and self.hi is not None:
            return f"{kind} in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{kind} {'>' if self.lo_open else '>='} {self.lo}"
        if self.hi is not None:
            return f"{kind} {'<' if self.hi_open else '<='} {self.hi}"
        return kind

    def contains(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if (self.integer and not isinstance(value, int)) or not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def check(self, name: str, value):
        """``value``, or an ``OptionError`` naming the option and its range."""
        if not self.contains(value):
            raise OptionError(f"{name} must be {self.describe()}, got {value!r}")
        return value


POSITIVE_INT = Range(lo=1, integer=True)
NON_NEGATIVE_INT = Range(lo=0, integer=True)
POSITIVE = Range(lo=0, lo_open=True)
NON_NEGATIVE = Range(lo=0)
FRACTION = Range(lo=0, hi=1)
OPEN_FRACTION = Range(lo=0, hi=1, lo_open=True, hi_open=True)
TOP_P = Range(lo=0, hi=1, lo_open=True)  # 0 would keep no token
SEED = Range(lo=0, hi=2**32 - 1, integer=True)  # what numpy's and torch's generators both accept


class Number(click.ParamType):
    """A Click option type checked against a ``Range`` (``--top-p nan`` is refused while parsing, exit 2)."""

    def __init__(self, rng: Range):
        self.rng = rng
        self.name = "integer" if rng.integer else "float"

    def convert(self, value, param, ctx):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            value = (click.INT if self.rng.integer else click.FLOAT).convert(value, param, ctx)
        if not self.rng.contains(value):
            self.fail(f"must be {self.rng.describe()}, got {value!r}", param, ctx)
        return value


def utf8_text(ctx, param, value):
    """Click callback: refuse text that is not valid UTF-8 (on Linux, undecodable argv bytes arrive as lone
    surrogates, which the tokenizer cannot take)."""
    if value is None:
        return value
    if isinstance(value, tuple):  # a repeatable option
        return tuple(utf8_text(ctx, param, v) for v in value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise click.BadParameter(f"is not valid UTF-8 text (byte {value[e.start].encode('utf-8', 'surrogateescape')!r}"
                                 f" at character {e.start})", ctx, param) from None
    return value


def writable_file(ctx, param, value):
    """Click callback: an output file path that can be written, checked before the work whose results it holds."""
    if value is None:
        return value
    path = Path(value)
    if path.is_dir():
        raise click.BadParameter(f"{path} is a folder; give a file name", ctx, param)
    parent = path.parent
    if not parent.is_dir():
        raise click.BadParameter(f"folder {parent} does not exist", ctx, param)
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise click.BadParameter(f"{path} cannot be written (permission denied)", ctx, param)
    return value


def check_sampling(p) -> None:
    """The sampling options every generation path takes (``SamplingParams`` and its runtime subclass)."""
    POSITIVE_INT.check("max_tokens", p.max_tokens)
    NON_NEGATIVE.check("temperature", p.temperature)  # 0: greedy
    TOP_P.check("top_p", p.top_p)
    SEED.check("seed", p.seed)
