"""What a user gets from the example checkpoint, pinned to the byte.

Restructuring qcli must not change a single byte of its output: every file qcli wrote for
`examples/tiny-llama` when these digests were taken is compared here (the provenance file
records paths and options, and is left out). A file qcli writes in addition later (a model
card) is not pinned by this test; the files that were there must stay as they were.
"""

from __future__ import annotations

import hashlib

import pytest

from qcli.cli.app import main
from tests.builders import EXAMPLE

CONFIG = "config.json"
GENERATION = "generation_config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
GEN_DIGEST = "5d1ec5cead41d3f706140730065a8a422954c11c51f70f69d038bb26ec660def"

# (scheme, extra options) -> {file: sha256}
PINNED: dict[tuple[str, tuple[str, ...]], dict[str, str]] = {
    ("W8A8", ()): {
        CONFIG: "85ee48f9ca04424627eeea1d3903c91e84e2fd2e4640a9aad1fe499e640fcdc3",
        SINGLE: "24dfc30a4049000333b4d2993d4233c7f849ba281f76d6c1f913796d38957de9",
    },
    ("W8A8", ("--lm-head",)): {
        CONFIG: "49c41e1f48857cb084ba940add6d4d5265b5d8c3f7babae59cc61e14b685b6db",
        SINGLE: "c12d72d8c1b52ba9890b9ec3c3cd36474367f2a52e97646789ed03c5541b6fd8",
    },
    ("W8A16", ()): {
        CONFIG: "c9be4b4b57d5d6339ef15f103c8cd4c5bde03a0dd89e9a38385b3de7b0903b51",
        SINGLE: "f17558b4baa9e50fb5ea359a8f6f711e549c6b63813bc000662c5418f992a64d",
    },
    ("W8A16", ("--lm-head",)): {
        CONFIG: "ee5e99f90fa0035ee08de0503e41745954b1da7620ae6da3fa6a8757d450a8b5",
        SINGLE: "2c04f2cbc692aaeb5b19720b9fc4ec3fae72c913dbbbcf88748f3233e6c053af",
    },
    ("FP8_DYNAMIC", ()): {
        CONFIG: "dcd9b5cd1408070a12d239e335aeddb9d945d61a406f209415a54f507585958c",
        SINGLE: "8116c63e077610632b4be3b44cfe415264269cc9c124f9c460cbe9faf852e129",
    },
    ("FP8_DYNAMIC", ("--lm-head",)): {
        CONFIG: "9e3702d659e09e09a6ec7fe4890eac29a9ab4c78880038f653c1281db8221a76",
        SINGLE: "4a94da3bf9baddcc529bef3dd5d533df1a5d527d3f0ed1b1992ca123ca41de7b",
    },
    ("FP8", ()): {
        CONFIG: "966329d033dc18f85a31ced945ac9dcf1ced259bef8c0eb0a93cec7e80a935ab",
        SINGLE: "8116c63e077610632b4be3b44cfe415264269cc9c124f9c460cbe9faf852e129",
    },
    ("FP8", ("--lm-head",)): {
        CONFIG: "786335fee6db45dcbc6b53c6ce952ee292ff1ca1230be025c133df276e402e09",
        SINGLE: "4a94da3bf9baddcc529bef3dd5d533df1a5d527d3f0ed1b1992ca123ca41de7b",
    },
    ("W8A8", ("--lm-head", "--max-shard-size", "1MB")): {
        CONFIG: "49c41e1f48857cb084ba940add6d4d5265b5d8c3f7babae59cc61e14b685b6db",
        "model-00001-of-00003.safetensors": (
            "393ab038906debca3b61305bf26313cffc04be305bb69bc6118732edbfd316f6"
        ),
        "model-00002-of-00003.safetensors": (
            "ea8a68e2f2e1e2d0bb2aa0768125675ffe2f8c8dcf900d609b60ba804143c057"
        ),
        "model-00003-of-00003.safetensors": (
            "d4a7af912529c16607d2ee0dc671ae5d8dd0520f06a6467831376c70f7780f8c"
        ),
        INDEX: "1c563c6e80afd90e5ef0c63523e30864bd1a8ef63ed735d9e1f4a7e5b1d93e80",
    },
    ("FP8_DYNAMIC", ("--lm-head", "--max-shard-size", "1MB")): {
        CONFIG: "9e3702d659e09e09a6ec7fe4890eac29a9ab4c78880038f653c1281db8221a76",
        "model-00001-of-00003.safetensors": (
            "6bef731011633ccc6c67701a31ec24fee39a5fd96658a7ee28e9a1f7a8251913"
        ),
        "model-00002-of-00003.safetensors": (
            "677fd6f9a2291826abefa391027d15b25b6ac4df6dc375a4e9e186d1d038ae06"
        ),
        "model-00003-of-00003.safetensors": (
            "43640bd47f2dfd7a62e2c7b41d011fff9772716f49a274f4074b960cbc817190"
        ),
        INDEX: "1c563c6e80afd90e5ef0c63523e30864bd1a8ef63ed735d9e1f4a7e5b1d93e80",
    },
}


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("scheme", "extra"), list(PINNED), ids=[f"{s}{''.join(e)}" for s, e in PINNED]
)
def test_example_output_is_pinned(tmp_path, scheme, extra):
    out = tmp_path / "out"
    assert main(["quantize", str(EXAMPLE), str(out), "--scheme", scheme, "-q", *extra]) == 0
    want = {**PINNED[(scheme, extra)], GENERATION: GEN_DIGEST}
    got = {name: _sha256(out / name) for name in want}
    assert got == want
    # no weight file and no index beyond the pinned ones
    weights = {p.name for p in out.iterdir() if p.name.startswith("model")}
    assert weights == {n for n in want if n.startswith("model")}
