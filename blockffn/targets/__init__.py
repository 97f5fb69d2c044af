"""Target presets: one registry that the compiler, `--list-targets` and `verify` share."""

from blockffn.targets.registry import TARGETS, TargetPreset, get_target, list_targets

__all__ = ["TARGETS", "TargetPreset", "get_target", "list_targets"]
