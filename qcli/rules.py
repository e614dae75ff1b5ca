"""Targets and ignore lists, with compressed-tensors' matching semantics (utils/match.py).

An entry starting with ``re:`` is a regex applied with ``re.match`` (anchored at the start, not
the end) to the module name; any other entry equals the full module name or the module's class
name. ``ignore`` wins over ``targets``. The result also says which entry decided, so plans can
show users why a module was quantized or kept.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from qcli.errors import InputError

DEFAULT_TARGETS = ("Linear",)

# Modules users keep dense even though transformers builds them as nn.Linear: MoE routers
# (tiny, and their logits pick experts, so error compounds) and vision towers/projectors
# (vLLM often runs them through separate, unquantized code paths). role -> why.
# lm_head is in the list because vLLM only quantizes its ParallelLMHead when lm_head is named
# in targets; qcli quantizes it on request (--lm-head) and then names it.
# Default ignores only overrule a class match ("Linear"): a name or regex that picks a module
# out is the user's explicit wish.
DEFAULT_IGNORE_ROLES: dict[str, str] = {
    "lm_head": "lm_head (--lm-head quantizes it)",
    "router": "MoE router",
    "vision": "vision tower / projector",
}


@dataclass(frozen=True)
class Match:
    selected: bool  # targeted and not ignored
    rule: str  # human-readable reason, e.g. "target 'Linear' (class)"


@lru_cache(maxsize=512)
def _compile(entry: str) -> re.Pattern[str]:
    try:
        return re.compile(entry.removeprefix("re:"))
    except re.error as e:
        raise InputError(f"invalid regular expression {entry!r}: {e}") from None


def validate(entries: Sequence[str]) -> None:
    """Fail early, with the entry named, on an empty entry or a broken regex."""
    for e in entries:
        if not e or not e.strip():
            raise InputError("empty --targets/--ignore entry")
        if e.startswith("re:"):
            _compile(e)


def entry_matches(entry: str, name: str, kind: str) -> str | None:
    """How `entry` matches module `name` of class `kind` ("regex", "name", "class"), or None."""
    if entry.startswith("re:"):
        return "regex" if _compile(entry).match(name) else None
    if entry == name:
        return "name"
    if entry == kind:
        return "class"
    return None


def first_match(entries: Sequence[str], name: str, kind: str) -> tuple[str, str] | None:
    for e in entries:
        how = entry_matches(e, name, kind)
        if how:
            return e, how
    return None


def decide(
    name: str,
    kind: str,
    role: str | None,
    targets: Sequence[str],
    ignore: Sequence[str],
    default_ignore: bool = True,
) -> Match:
    """Whether module `name` is quantized, and the rule that decided it."""
    # An entry that names the module (or a regex that picks it) outranks a class match, so
    # that default ignores yield to it whatever the order of the targets.
    explicit = [e for e in targets if entry_matches(e, name, kind) in ("name", "regex")]
    t = (explicit[0], entry_matches(explicit[0], name, kind)) if explicit else None
    t = t or first_match(targets, name, kind)
    if t is None:
        return Match(False, "not targeted")
    i = first_match(ignore, name, kind)
    if i is not None:
        return Match(False, f"ignore {i[0]!r} ({i[1]})")
    if default_ignore and role in DEFAULT_IGNORE_ROLES and t[1] == "class":
        return Match(False, f"default ignore: {DEFAULT_IGNORE_ROLES[role]}")
    return Match(True, f"target {t[0]!r} ({t[1]})")
