"""Targets and ignore lists, matched the way compressed-tensors matches them: written once.

compressed-tensors (utils/match.py, quantization/lifecycle/apply.py):

- an entry starting with ``re:`` is a regex applied with ``re.match`` (anchored at the start,
  not the end) to the module name; any other entry equals the full module name or the
  module's class name;
- a module is quantized when some target matches it and no ``ignore`` entry does (ignore
  wins, by name, regex or class alike);
- its scheme is that of the most specific matching target: exact names first, then regexes
  (each sorted as strings), then class names; a target listed in several groups belongs to
  the last group that lists it.

:class:`Matcher` is that rule. The planner asks it which of the user's entries selects a
module, the checks and inspect ask it which group of a written config quantizes a module,
so what qcli plans and what it later reads back can never disagree on an order. The result
names the entry that decided, so plans can show users why a module was quantized or kept.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from qcli.errors import InputError

DEFAULT_TARGETS = ("Linear",)

# Modules users keep dense even though transformers builds them as nn.Linear: MoE routers
# (tiny, and their logits pick experts, so error compounds), vision towers/projectors
# (vLLM often runs them through separate, unquantized code paths) and classification heads
# (a few rows, read once per sequence: nothing to gain, accuracy to lose).
# lm_head is in the list because vLLM only quantizes its ParallelLMHead when lm_head is named
# in targets; qcli quantizes it on request (--lm-head) and then names it.
# Default ignores only overrule a class match ("Linear"): a name or regex that picks a module
# out is the user's explicit wish. role -> why.
DEFAULT_IGNORE_ROLES: dict[str, str] = {
    "lm_head": "lm_head (--lm-head quantizes it)",
    "router": "MoE router",
    "vision": "vision tower / projector",
    "classifier": "classification head (name it in --targets to quantize it)",
}

NAME, REGEX, CLASS = "name", "regex", "class"


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


def entry_matches(entry: str, name: str, cls: str) -> str | None:
    """How `entry` matches module `name` of class `cls` (NAME, REGEX, CLASS), or None."""
    if entry.startswith("re:"):
        return REGEX if _compile(entry).match(name) else None
    if entry == name:
        return NAME
    if entry == cls:
        return CLASS
    return None


def _specificity(entry: str) -> tuple[bool, str]:
    # compressed-tensors' match_targets sort key: exact strings, then regexes, by string
    return ("re:" in entry, entry)


@dataclass(frozen=True)
class Hit:
    """The entry that matched a module, how, and the group that listed it (None: no groups)."""

    entry: str
    how: str  # NAME, REGEX or CLASS
    group: str | None = None

    def describe(self, what: str = "target") -> str:
        return f"{what} {self.entry!r} ({self.how})"


class Matcher:
    """compressed-tensors' matching of modules against config groups' targets and an ignore
    list. `groups` maps a group name to its targets; a plain list of targets is one group
    named None (the user's --targets)."""

    def __init__(
        self,
        groups: Mapping[str, Sequence[str]] | Sequence[str],
        ignore: Sequence[str] = (),
        spellings: Callable[[str], list[str]] | None = None,
    ):
        """`spellings`: every name a module goes by (qcli.names: its disk and its loaded
        name, for vision-language models); an entry matching any of them matches."""
        items = groups.items() if isinstance(groups, Mapping) else [(None, groups)]
        self._spell = spellings or (lambda n: [n])
        owner: dict[str, str | None] = {}
        for group, targets in items:
            for t in targets:
                owner[t] = group  # a later group takes the target over, as in apply.py
        self._owner = owner
        self._ordered = sorted(owner, key=_specificity)
        self.ignore = tuple(ignore)

    @property
    def targets(self) -> list[str]:
        return list(self._owner)

    def target(self, name: str, cls: str) -> Hit | None:
        """The most specific target that matches, ignore aside."""
        names = self._spell(name)
        for t in self._ordered:
            for n in names:
                how = entry_matches(t, n, cls)
                if how in (NAME, REGEX):
                    return Hit(t, how, self._owner[t])
        for t in self._ordered:
            if entry_matches(t, name, cls) == CLASS:
                return Hit(t, CLASS, self._owner[t])
        return None

    def ignored(self, name: str, cls: str) -> Hit | None:
        """The first ignore entry that matches (ignore entries match by class too)."""
        names = self._spell(name)
        for e in self.ignore:
            for n in names:
                how = entry_matches(e, n, cls)
                if how:
                    return Hit(e, how)
        return None

    def match(self, name: str, cls: str) -> Hit | None:
        """The target that quantizes module `name` of class `cls` in a loader, or None."""
        if self.ignored(name, cls):
            return None
        return self.target(name, cls)

    def unmatched_targets(self, modules: Iterable[tuple[str, str]]) -> list[str]:
        """Targets that match none of the (name, class) pairs, in their listed order."""
        pairs = [(s, c) for n, c in modules for s in self._spell(n)]
        return [t for t in self._owner if not any(entry_matches(t, n, c) for n, c in pairs)]

    def unmatched_ignores(self, modules: Iterable[tuple[str, str]]) -> list[str]:
        pairs = [(s, c) for n, c in modules for s in self._spell(n)]
        return [i for i in self.ignore if not any(entry_matches(i, n, c) for n, c in pairs)]


@dataclass(frozen=True)
class Match:
    selected: bool  # targeted and not ignored
    rule: str  # human-readable reason, e.g. "target 'Linear' (class)"


def decide(
    name: str,
    cls: str,
    role: str | None,
    matcher: Matcher,
    default_ignore: bool = True,
) -> Match:
    """Whether the planner quantizes module `name`, and the rule that decided it.

    compressed-tensors' matching, plus qcli's default ignores (DEFAULT_IGNORE_ROLES), which
    yield to any entry that names the module or picks it with a regex."""
    hit = matcher.target(name, cls)
    if hit is None:
        return Match(False, "not targeted")
    ignored = matcher.ignored(name, cls)
    if ignored is not None:
        return Match(False, ignored.describe("ignore"))
    if default_ignore and role in DEFAULT_IGNORE_ROLES and hit.how == CLASS:
        return Match(False, f"default ignore: {DEFAULT_IGNORE_ROLES[role]}")
    return Match(True, hit.describe())
