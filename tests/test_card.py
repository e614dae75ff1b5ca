"""The model card qcli writes: the hub's front matter, what was done, and the source's card
kept below it (never overwritten)."""

from __future__ import annotations

import shutil
from pathlib import Path

from qcli.cli.app import main
from tests.builders import EXAMPLE


def test_card_says_what_was_done(tmp_path: Path) -> None:
    out = tmp_path / "tiny-W8A8"
    assert main(["quantize", str(EXAMPLE), str(out), "--lm-head", "-q"]) == 0
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    for tag in ("compressed-tensors", "int8", "w8a8", "vllm"):
        assert f"- {tag}" in front
    assert "library_name: transformers" in front
    assert "qcli quantize tiny-llama OUT --scheme W8A8 --lm-head" in card
    assert "# tiny-llama: W8A8" in card
    assert "int-quantized" in card and "15 Linear modules" in card


def test_the_source_card_is_kept_below(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(EXAMPLE, src)
    (src / "README.md").write_text(
        "---\nlicense: apache-2.0\nlanguage:\n- en\ntags:\n- text-generation\n---\n"
        "# Tiny Llama\n\nThe original card, with its own words.\n"
    )
    out = tmp_path / "out"
    assert main(["quantize", str(src), str(out), "-s", "FP8_DYNAMIC", "-q"]) == 0
    card = (out / "README.md").read_text()
    assert "license: apache-2.0" in card.split("---")[1]  # carried into the front matter
    assert card.index("<!-- qcli model card -->") < card.index("## The original model card")
    assert "The original card, with its own words." in card
    assert card.count("---\n") == 2  # one front matter
    assert (src / "README.md").read_text().startswith("---\nlicense")  # the source untouched


def test_the_card_is_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b" / "elsewhere"  # OUT's name is not in the card
    for out in (a, b):
        assert main(["quantize", str(EXAMPLE), str(out), "-q"]) == 0
    assert (a / "README.md").read_bytes() == (b / "README.md").read_bytes()
