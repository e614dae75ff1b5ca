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


def test_ignore_wins_and_rules_are_named() -> None:
    m = rules.decide("a.q_proj", "Linear", None, ["Linear"], ["re:.*q_proj"])
    assert not m.selected and "re:.*q_proj" in m.rule
    m = rules.decide("a.q_proj", "Linear", None, ["Linear"], [])
    assert m.selected and "class" in m.rule


def test_default_ignores_only_overrule_class_matches() -> None:
    assert not rules.decide("m.gate", "Linear", "router", ["Linear"], []).selected
    assert rules.decide("m.gate", "Linear", "router", ["Linear"], [], default_ignore=False).selected
    assert rules.decide("m.gate", "Linear", "router", ["re:.*gate"], []).selected


def test_bad_regex_is_an_input_error() -> None:
    with pytest.raises(InputError, match="invalid regular expression"):
        rules.validate(["re:("])
    with pytest.raises(InputError, match="empty"):
        rules.validate([""])
