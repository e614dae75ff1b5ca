"""Matching follows compressed-tensors' own is_match, checked against the real function."""

from __future__ import annotations

import pytest
import torch

from qcli import rules
from qcli.errors import InputError

CASES = [
    ("Linear", "model.layers.0.mlp.down_proj", "Linear"),
    ("lm_head", "lm_head", "Linear"),
    ("re:.*down_proj", "model.layers.0.mlp.down_proj", "Linear"),
    ("re:down_proj", "model.layers.0.mlp.down_proj", "Linear"),  # anchored: no match
    ("re:model.layers.0", "model.layers.0.mlp.up_proj", "Linear"),  # prefix match, unanchored end
    ("re:.*lm_head$", "lm_head", "Linear"),
    ("Embedding", "model.embed_tokens", "Embedding"),
    ("Linear", "model.embed_tokens", "Embedding"),
    ("model.layers.0.mlp", "model.layers.0.mlp.up_proj", "Linear"),  # exact names only
]


@pytest.mark.parametrize(("entry", "name", "kind"), CASES)
def test_matches_compressed_tensors(entry: str, name: str, kind: str) -> None:
    from compressed_tensors.utils.match import is_match

    module = torch.nn.Linear(2, 2) if kind == "Linear" else torch.nn.Embedding(2, 2)
    assert (rules.entry_matches(entry, name, kind) is not None) == is_match(name, module, entry)


def _decide(name, cls, role, targets, ignore, **kw):
    return rules.decide(name, cls, role, rules.Matcher(targets, ignore), **kw)


def test_ignore_wins_and_rules_are_named() -> None:
    m = _decide("a.q_proj", "Linear", None, ["Linear"], ["re:.*q_proj"])
    assert not m.selected and "re:.*q_proj" in m.rule
    m = _decide("a.q_proj", "Linear", None, ["Linear"], [])
    assert m.selected and "class" in m.rule


def test_default_ignores_only_overrule_class_matches() -> None:
    assert not _decide("m.gate", "Linear", "router", ["Linear"], []).selected
    assert _decide("m.gate", "Linear", "router", ["Linear"], [], default_ignore=False).selected
    assert _decide("m.gate", "Linear", "router", ["re:.*gate"], []).selected
    assert not _decide("score", "Linear", "classifier", ["Linear"], []).selected
    assert _decide("score", "Linear", "classifier", ["Linear", "score"], []).selected


# Group configs of the kind people write: names, regexes and classes across groups, some
# targets in two groups, ignore by name, regex and class.
GROUPS = [
    {"g0": ["Linear"], "g1": ["re:.*down_proj"], "g2": ["lm_head"]},
    {"g0": ["re:.*proj"], "g1": ["re:.*mlp.*"], "g2": ["Linear"]},
    {"g0": ["model.layers.0.mlp.down_proj", "Linear"], "g1": ["re:.*layers.0.*", "Linear"]},
    {"g0": ["lm_head", "re:.*lm_head$"], "g1": ["re:.*"]},
]
IGNORES = [[], ["lm_head"], ["re:.*q_proj$"], ["Embedding"], ["Linear"]]
MODULES = [
    ("model.layers.0.mlp.down_proj", torch.nn.Linear),
    ("model.layers.0.self_attn.q_proj", torch.nn.Linear),
    ("model.layers.1.mlp.up_proj", torch.nn.Linear),
    ("lm_head", torch.nn.Linear),
    ("model.embed_tokens", torch.nn.Embedding),
]


@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("ignore", IGNORES)
def test_matcher_picks_the_scheme_compressed_tensors_picks(groups, ignore) -> None:
    """The group that quantizes each module, against compressed-tensors' own apply logic:
    match_named_modules (targets, then ignore) and match_targets' order into the ordered
    target -> scheme map (a later group takes a repeated target over)."""
    from collections import OrderedDict

    from compressed_tensors.utils.match import is_match, match_targets

    target_to_group: OrderedDict[str, str] = OrderedDict()
    for group, targets in groups.items():
        for t in targets:
            target_to_group[t] = group
    matcher = rules.Matcher(groups, ignore)
    for name, cls in MODULES:
        module = cls(2, 2)
        selected = is_match(name, module, list(target_to_group), ignore)
        want = None
        if selected:
            want = target_to_group[match_targets(name, module, target_to_group)[0]]
        hit = matcher.match(name, cls.__name__)
        assert (hit.group if hit else None) == want, (name, groups, ignore)


def test_bad_regex_is_an_input_error() -> None:
    with pytest.raises(InputError, match="invalid regular expression"):
        rules.validate(["re:("])
    with pytest.raises(InputError, match="empty"):
        rules.validate([""])
