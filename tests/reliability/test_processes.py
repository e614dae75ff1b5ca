"""What only a real process shows: signals mid-write, a file-size limit, two runs on one OUT.

Each test runs the console entry point in a child process on a checkpoint large enough
(~200 MB of bf16) that it is still writing when the test acts, and acts only once the run's
temporary folder holds a shard, so "mid-write" is certain rather than a matter of timing.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qcli.errors import EXIT_INTERRUPTED, EXIT_OUTPUT_FAILED, EXIT_TERMINATED
from tests.builders import llama_checkpoint as _llama
from tests.reliability.util import (
    QCLI,
    assert_one_line_error,
    leftovers,
    spawn,
    tree_state,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux process semantics")


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A two-layer Llama-shaped checkpoint of ~200 MB, and its checksummed state."""
    src = tmp_path_factory.mktemp("big") / "src"
    src.mkdir()
    h, i, v = 2048, 5632, 4096
    g = torch.Generator().manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=g) - 0.5).bfloat16()

    ts = {"model.embed_tokens.weight": w(v, h), "model.norm.weight": torch.ones(h).bfloat16()}
    ts["lm_head.weight"] = w(v, h)
    for layer in range(2):
        p = f"model.layers.{layer}"
        for name, shape in {
            "self_attn.q_proj": (h, h),
            "self_attn.k_proj": (h // 4, h),
            "self_attn.v_proj": (h // 4, h),
            "self_attn.o_proj": (h, h),
            "mlp.gate_proj": (i, h),
            "mlp.up_proj": (i, h),
            "mlp.down_proj": (h, i),
        }.items():
            ts[f"{p}.{name}.weight"] = w(*shape)
        ts[f"{p}.input_layernorm.weight"] = torch.ones(h).bfloat16()
    save_file(ts, src / "model.safetensors", metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": i,
        "vocab_size": v,
        "num_hidden_layers": 2,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "tie_word_embeddings": False,
    }
    (src / "config.json").write_text(json.dumps(config))
    return src, tree_state(src)


def _wait_writing(proc: subprocess.Popen[str], out: Path, timeout: float = 120) -> None:
    """Block until `proc` has created its temporary folder and started a shard in it."""
    shard = out.parent / f".{out.name}.qcli-tmp-{proc.pid}" / "model.safetensors"
    deadline = time.monotonic() + timeout
    while not shard.exists():
        if proc.poll() is not None:
            pytest.fail(f"qcli exited ({proc.returncode}) before writing: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("qcli never started writing")
        time.sleep(0.005)


def _only(root: Path, *names: str) -> None:
    assert sorted(p.name for p in root.iterdir()) == sorted(names)


@pytest.mark.parametrize(
    ("sig", "count", "message"),
    [
        (signal.SIGINT, 1, "interrupted; partial output removed"),
        (signal.SIGTERM, 1, "terminated (SIGTERM); partial output removed"),
        # impatient users press Ctrl-C again: the cleanup must not be cut short
        (signal.SIGINT, 6, "interrupted; partial output removed"),
    ],  # exit 128 + the signal's number, as shells report it: 130 for SIGINT, 143 for SIGTERM
    ids=["SIGINT", "SIGTERM", "SIGINT-burst"],
)
def test_signal_mid_write_leaves_nothing(
    big: tuple[Path, dict], tmp_path: Path, sig: int, count: int, message: str
) -> None:
    src, state = big
    out = tmp_path / "out"
    proc = spawn(["quantize", src, out, "-q"])
    _wait_writing(proc, out)
    for _ in range(count):
        proc.send_signal(sig)
        time.sleep(0.01)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (EXIT_TERMINATED if sig == signal.SIGTERM else EXIT_INTERRUPTED), err
    assert_one_line_error(err, message)
    _only(tmp_path)  # no OUT, no temporary folder, no lock
    assert tree_state(src) == state


def test_file_size_limit_fails_cleanly(tmp_path: Path) -> None:
    """RLIMIT_FSIZE (SIGXFSZ ignored, so writes fail with EFBIG) acts like a full disk."""
    src = _llama(tmp_path / "src")
    state = tree_state(src)
    out = tmp_path / "out"

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    proc = spawn(["quantize", src, out, "-q"], preexec_fn=limit)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_OUTPUT_FAILED, err
    assert_one_line_error(err, "model.safetensors", "File too large")
    _only(tmp_path, "src")
    assert tree_state(src) == state


# A second qcli process that has already paid for its imports, and starts its run on cue.
_PRIMED = """
import sys
from qcli.cli.app import main
import qcli.convert, qcli.quant, qcli.tensors, torch, safetensors
print("ready", flush=True)
sys.stdin.readline()
sys.exit(main(sys.argv[1:]))
"""


def test_two_runs_on_one_out(big: tuple[Path, dict], tmp_path: Path, capsys) -> None:
    """Exactly one run writes OUT; the other stops at once and touches nothing."""
    src, state = big
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    second = subprocess.Popen(
        [sys.executable, "-c", _PRIMED, "quantize", str(src), str(out), "-q"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert second.stdout.readline().strip() == "ready"
    first = spawn(["quantize", src, out, "-q"])
    _wait_writing(first, out)
    _, err2 = second.communicate("go\n", timeout=120)
    _, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    assert second.returncode == EXIT_OUTPUT_FAILED, err2
    assert_one_line_error(err2, "another qcli run is writing", str(out))
    _only(tmp_path, "out")
    assert tree_state(src) == state
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.layers.1.mlp.down_proj.weight_scale" in names and "lm_head.weight" in names
    from tests.reliability.test_properties import verify_ok

    # the whole contract; the numbers of one layer (all of them take ~30 s at this size)
    verify_ok(out, capsys, "--fast", "--layers", r"layers\.0\.self_attn\.q_proj")


@pytest.mark.slow
def test_killed_run_is_cleaned_up_by_the_next(big: tuple[Path, dict], tmp_path: Path) -> None:
    """SIGKILL cannot be caught: the next run on the same OUT removes what it left."""
    src, state = big
    out = tmp_path / "out"
    proc = spawn(["quantize", src, out, "-q"])
    _wait_writing(proc, out)
    proc.kill()
    proc.communicate(timeout=60)
    assert leftovers(tmp_path, "out")  # a hidden temporary folder (never a finished-looking OUT)
    assert not out.exists()
    again = subprocess.run(
        [*QCLI, "quantize", str(src), str(out), "-q"], capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr
    _only(tmp_path, "out")
    assert tree_state(src) == state
