"""A module's two names: the one its tensors carry on disk, and the one transformers 5 gives
the module it builds (vision-language models).

transformers 5 saves Llava-style models under their legacy names (`language_model.model.
layers.0...`) and loads them into modules named `model.language_model.layers.0...`; it
renames on load (its conversion_mapping.py), and compressed-tensors matches a config's
`ignore` and `targets` against the *loaded* names. vLLM rewrites config entries from the
loaded spelling to its own (`apply_vllm_mapper`) and reads the disk spelling directly, so
an exact entry written in both spellings means the same module everywhere; written in the
disk spelling alone, transformers quantizes a module qcli kept dense (garbage, or NaN
logits for Qwen2-VL). qcli matches entries against both spellings and writes both.

The renames are transformers 5.24's, as they compose for the whole model, checked against
the modules transformers builds by tests/interop/test_vlm_names.py. Headers only: nothing
here imports transformers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from qcli import kinds

# (disk prefix, loaded prefix), first match wins; a name already in the loaded spelling
# matches none of them (new-style checkpoints).
_LLAVA = (
    ("language_model.lm_head", "lm_head"),
    ("language_model.model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)
_QWEN_VL = (
    ("visual.", "model.visual."),
    ("model.", "model.language_model."),
)
# model_type -> renames (transformers' conversion_mapping: the types that alias to "llava"
# and "llava_next", and Qwen2VLForConditionalGeneration's)
RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    **dict.fromkeys(
        (
            "llava", "llava_next", "llava_next_video", "llava_onevision", "aria", "paligemma",
            "aya_vision", "got_ocr2", "gemma3", "internvl", "vipllava", "mistral3",
        ),
        _LLAVA,
    ),
    **dict.fromkeys(("qwen2_vl", "qwen2_5_vl"), _QWEN_VL),
}  # fmt: skip
_ALREADY_LOADED = re.compile(r"^model\.(language_model|visual|vision_tower|multi_modal_projector)")


class Names:
    """Both spellings of every module name of one model."""

    def __init__(self, config: Mapping[str, Any]):
        types = kinds.model_types(config)
        top = config.get("model_type")
        self.renames = RENAMES.get(top, ()) if isinstance(top, str) else ()
        if not self.renames:
            self.renames = next((RENAMES[t] for t in sorted(types) if t in RENAMES), ())

    def __bool__(self) -> bool:
        return bool(self.renames)

    def loaded(self, name: str) -> str:
        """transformers 5's name for the module `name` names on disk."""
        if _ALREADY_LOADED.match(name):
            return name
        for disk, loaded in self.renames:
            if name == disk.rstrip(".") or name.startswith(disk):
                return (
                    loaded.rstrip(".") if name == disk.rstrip(".") else loaded + name[len(disk) :]
                )
        return name

    def on_disk(self, name: str) -> str:
        """The disk spelling of a loaded module name (inverse of :meth:`loaded`)."""
        for disk, loaded in self.renames:
            if name == loaded.rstrip(".") or name.startswith(loaded):
                return (
                    disk.rstrip(".") if name == loaded.rstrip(".") else disk + name[len(loaded) :]
                )
        return name

    def spellings(self, name: str) -> list[str]:
        """`name` and its other spelling, if it has one (disk first)."""
        disk = self.on_disk(name)
        loaded = self.loaded(disk)
        return [disk] if disk == loaded else [disk, loaded]

    def both(self, names: Iterable[str]) -> list[str]:
        """Every exact name in both spellings (regex entries as they are), order kept."""
        out: list[str] = []
        for n in names:
            for s in [n] if n.startswith("re:") else self.spellings(n):
                if s not in out:
                    out.append(s)
        return out


def _swap(name: str, old: str, new: str) -> str | None:
    """`name` with prefix `old` (a module path, or one ending in ".") replaced by `new`."""
    if name == old.rstrip("."):
        return new.rstrip(".")
    head = old if old.endswith(".") else old + "."
    if name.startswith(head):
        return (new if new.endswith(".") else new + ".") + name[len(head) :]
    return None
