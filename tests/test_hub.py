"""Hub repo ids: headers without weights (qcli.hub) and quantize from the cache (qcli.source).

A small HTTP server in a thread plays the hub: it serves local checkpoint folders under the
hub's URL layout (``/api/models/...``, ``/{repo}/resolve/{rev}/{file}``) with byte ranges, the
hub's error headers and commit headers. The real huggingface_hub client talks to it through
HF_ENDPOINT, in subprocesses: huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE
when it is imported, and the test session itself runs with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import json
from pathlib import Path

from qcli.hub import FIRST_RANGE
from tests.builders import load_config
from tests.fakehub import FakeHub, qcli

# --- qcli.hub: headers without weights ---------------------------------------------------


def test_inspect_hub_repo_reads_only_headers(hub: FakeHub, models, tmp_path: Path) -> None:
    commit = hub.add("org/sharded", models["llama-sharded"])
    shards = sorted(p.name for p in models["llama-sharded"].glob("*.safetensors"))
    assert len(shards) > 1
    r = qcli(hub, tmp_path / "hf", "inspect", "org/sharded", "--json")
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert body["source"]["repo_id"] == "org/sharded"
    assert body["source"]["revision"] == commit
    local = _local_json(models["llama-sharded"])
    assert [t["name"] for t in body["tensors"]] == [t["name"] for t in local["tensors"]]
    assert body["parameters"] == local["parameters"]
    # Only each shard's header crossed the wire, one range request each: no weights.
    got = [s for s in hub.log if s.path.endswith(".safetensors")]
    assert sorted(s.path.rsplit("/", 1)[1] for s in got) == shards
    assert all(s.status == 206 and s.sent <= FIRST_RANGE for s in got)
    # ...and no safetensors file was written to the cache.
    assert not list((tmp_path / "hf").rglob("*.safetensors"))


def _local_json(folder: Path) -> dict:
    import io
    from contextlib import redirect_stdout

    from qcli.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["inspect", str(folder), "--json"]) == 0
    return json.loads(buf.getvalue())


def test_revision_plan_and_offline_reuse(hub: FakeHub, models, tmp_path: Path) -> None:
    hub.add("org/m", models["llama"])
    v2 = hub.add("org/m", models["qwen2"], ref="v2")
    home = tmp_path / "hf"
    args = ("inspect", "org/m", "--revision", "v2", "--lm-head", "--json")
    r = qcli(hub, home, *args)
    assert r.returncode == 0, r.stderr
    online = json.loads(r.stdout)
    assert online["source"]["revision"] == v2 and online["model_type"] == "qwen2"
    assert online["source"]["headers_fetched"] == ["model.safetensors"]
    plan = online["plan"]
    assert plan["lm_head"] == "quantized" and plan["untie_lm_head"]
    # Offline, the same question is answered from the cache, without a single request.
    seen = len(hub.log)
    r = qcli(hub, home, *args, offline=True)
    assert r.returncode == 0, r.stderr
    offline = json.loads(r.stdout)
    assert len(hub.log) == seen
    assert offline["source"]["headers_cached"] == ["model.safetensors"]
    for key in ("tensors", "modules", "plan", "parameters"):
        assert offline[key] == online[key], key
    # A revision never read online is not in the cache: one line, exit code 2.
    r = qcli(hub, home, "inspect", "org/m", offline=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "not in the local cache" in r.stderr


def test_hub_errors_are_one_line(hub: FakeHub, models, tmp_path: Path) -> None:
    hub.add("org/m", models["llama"])
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(load_config(models["llama"])))
    (no_weights / "pytorch_model.bin").write_bytes(b"not read")
    hub.add("org/pickle", no_weights)
    cases = [
        (["org/none"], "no such repo"),
        (["org/m", "--revision", "nope"], "no revision 'nope'"),
        (["org/pickle"], "no model.safetensors"),
        (["not a repo"], "not a hub repo id"),
    ]
    for args, message in cases:
        r = qcli(hub, tmp_path / "hf", "inspect", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr


def test_unreachable_hub_fails_fast_without_retry_lines(tmp_path: Path) -> None:
    """No network: one request without retries tells, then the one-line error (inspect
    took 23 s and printed 11 retry lines through huggingface_hub's own downloads)."""
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = FakeHub(url=f"http://127.0.0.1:{port}")
    for cmd in (["inspect", "org/m"], ["quantize", "org/m", str(tmp_path / "out")]):
        t0 = time.monotonic()
        r = qcli(dead, tmp_path / "hf", *cmd)
        assert time.monotonic() - t0 < 15, r.stderr
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "cannot be reached" in r.stderr and "Retrying" not in r.stderr


def test_large_header_takes_a_second_range(hub: FakeHub, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "many"
    folder.mkdir()
    n = 2500  # ~95 header bytes per tensor: the header outgrows the first 100 kB range
    tensors = {f"model.layers.{i}.input_layernorm.weight": torch.ones(4) for i in range(n)}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    (folder / "config.json").write_text(json.dumps(config))
    hub.add("org/many", folder)
    r = qcli(hub, tmp_path / "hf", "inspect", "org/many", "--json")
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert len(body["tensors"]) == n and body["parameters"] == 4 * n
    # no Linear layer: the summary stands and the plan says why there is none (exit 0)
    assert body["plan"] is None and body["plan_error"]
    gets = [s for s in hub.log if s.path.endswith(".safetensors")]
    assert [s.status for s in gets] == [206, 206]
    assert sum(s.sent for s in gets) < (folder / "model.safetensors").stat().st_size


def test_quantized_repo_on_the_hub(hub: FakeHub, models, tmp_path: Path) -> None:
    from qcli.cli import main

    out = tmp_path / "w8a8"
    assert main(["quantize", str(models["llama"]), str(out), "--lm-head", "-q"]) == 0
    hub.add("org/m-W8A8", out)
    r = qcli(hub, tmp_path / "hf", "inspect", "org/m-W8A8", "--json")
    assert r.returncode == 0, r.stderr
    q = json.loads(r.stdout)["quantization"]
    assert [g["scheme"] for g in q["groups"]] == ["W8A8"] and q["lm_head"] == "quantized"
    assert q["compression_ratio"] > 1.5
    # verify's checks read the scales' values, which stay on the hub: said, not faked
    assert q["contract"] is None and "not downloaded" in q["contract_error"]
    r = qcli(hub, tmp_path / "hf", "inspect", "org/m-W8A8")
    assert r.returncode == 0 and "W8A8" in r.stdout and "lm_head: quantized" in r.stdout


def test_dry_run_from_hub_downloads_no_weights(hub: FakeHub, models, tmp_path: Path) -> None:
    hub.add("org/m", models["llama-sharded"])
    out = tmp_path / "out"
    r = qcli(hub, tmp_path / "hf", "quantize", "org/m", str(out), "--dry-run", "--lm-head")
    assert r.returncode == 0, r.stderr
    assert "lm_head: quantized" in r.stdout and "nothing written" in r.stdout
    assert not out.exists()
    assert all(s.status == 206 for s in hub.log if s.path.endswith(".safetensors"))


# --- qcli.source: quantize from a hub repo id ---------------------------------------------


def test_quantize_from_hub_then_offline_with_revision(hub: FakeHub, models, tmp_path: Path) -> None:
    hub.add("org/m", models["llama"])
    v2 = hub.add("org/m", models["qwen2"], ref="v2")
    home = tmp_path / "hf"
    # Online: qcli.source downloads revision v2 through the real client, then quantizes it.
    online = tmp_path / "online"
    r = qcli(hub, home, "quantize", "org/m", str(online), "--revision", "v2", "--lm-head", "-q")
    assert r.returncode == 0, r.stderr
    provenance = json.loads((online / "qcli_provenance.json").read_text())
    assert provenance["source"] == {"repo_id": "org/m", "revision": v2}
    assert load_config(online)["model_type"] == "qwen2"
    # Offline: the same revision comes from the cache, with no request at all, and the
    # output is byte-identical.
    hub.log.clear()
    offline = tmp_path / "offline"
    r = qcli(
        hub, home, "quantize", "org/m", str(offline), "--revision", "v2", "--lm-head", "-q",
        offline=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert hub.log == []
    assert sorted(p.name for p in offline.iterdir()) == sorted(p.name for p in online.iterdir())
    for f in online.iterdir():
        assert (offline / f.name).read_bytes() == f.read_bytes(), f.name
    # The downloaded snapshot also serves inspect offline: headers read from the cache.
    r = qcli(hub, home, "inspect", "org/m", "--revision", "v2", "--json", offline=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["source"]["headers_cached"] == ["model.safetensors"]
    assert hub.log == []
    # An unknown repo offline: one line, exit code 2, nothing written.
    r = qcli(hub, home, "quantize", "org/unknown", str(tmp_path / "x"), offline=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "not in the local cache" in r.stderr and not (tmp_path / "x").exists()
