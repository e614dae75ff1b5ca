"""A run split into parts (`--part I/N`, then `--finish`; qcli.parts), and on Ray.

Parts run in any order, any of them again, and `--finish` gives the files a plain run gives,
byte for byte; a missing or truncated shard is refused by name; a part never writes into a
folder that holds anything else. The Ray runs (marker slow) start a real local cluster.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qcli import parts, planner
from qcli.api import plan_options
from qcli.cli.app import main
from qcli.convert import shard_jobs
from qcli.tensors import open_checkpoint
from tests.builders import EXAMPLE
from tests.fakehub import qcli

SHARD = "500KB"  # the example's 3.4 MB in five output shards


def _quantize(*args: str) -> int:
    return main(["quantize", *map(str, args), "-q", "--max-shard-size", SHARD])


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain") / "out"
    assert _quantize(EXAMPLE, out, "--lm-head") == 0
    return out


def test_parts_in_any_order_then_finish_equal_a_plain_run(plain, tmp_path):
    out = tmp_path / "parts"
    order = [1, 2, 3, 4]
    random.Random(7).shuffle(order)
    for i in [*order, order[0]]:  # one part run twice: it keeps what it wrote
        assert _quantize(EXAMPLE, out, "--lm-head", "--part", f"{i}/4") == 0
        assert not (out / "config.json").exists()  # never looks complete before --finish
    assert _quantize(EXAMPLE, out, "--lm-head", "--finish") == 0
    _same_files(plain, out)


def test_a_part_writes_only_its_own_shards(tmp_path, capsys):
    out = tmp_path / "parts"
    assert _quantize(EXAMPLE, out, "--part", "2/3", "--json") == 0
    got = json.loads(capsys.readouterr().out)
    plan = planner.build(open_checkpoint(EXAMPLE), plan_options())
    mine = parts.assign(shard_jobs(plan, 500_000), 3)[1]
    assert got["written"] == [j.name for j in mine]
    assert sorted(p.name for p in out.iterdir()) == sorted([parts.PARTS_DIR, *got["written"]])


def test_rerun_keeps_finished_shards_and_rewrites_a_damaged_one(tmp_path, capsys):
    out = tmp_path / "parts"
    assert _quantize(EXAMPLE, out, "--part", "1/2", "--json") == 0
    first = json.loads(capsys.readouterr().out)["written"]
    # a killed run leaves its temporary file; a shard's bytes are damaged in place
    (out / f".{first[0]}{parts.TMP_SUFFIX}").write_bytes(b"half")
    with open(out / first[-1], "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\xff")
    assert _quantize(EXAMPLE, out, "--part", "1/2", "--json") == 0
    again = json.loads(capsys.readouterr().out)
    assert again["written"] == [first[-1]] and again["kept"] == first[:-1]
    assert not list(out.glob(f"*{parts.TMP_SUFFIX}"))


def test_finish_refuses_a_missing_or_truncated_shard(tmp_path, capsys):
    out = tmp_path / "parts"
    for i in (1, 2):
        assert _quantize(EXAMPLE, out, "--part", f"{i}/2") == 0
    victim = sorted(out.glob("model-*.safetensors"))[2]
    saved = victim.read_bytes()
    victim.unlink()
    capsys.readouterr()
    assert _quantize(EXAMPLE, out, "--finish") == 2
    err = capsys.readouterr().err
    assert victim.name in err and "missing" in err and len(err.strip().splitlines()) == 1
    victim.write_bytes(saved[:-10])
    assert _quantize(EXAMPLE, out, "--finish") == 2
    assert victim.name in capsys.readouterr().err
    assert not (out / "config.json").exists()
    victim.write_bytes(saved)
    assert _quantize(EXAMPLE, out, "--finish") == 0
    assert (out / "config.json").exists() and not (out / parts.PARTS_DIR).exists()


def test_finish_refuses_shards_of_another_plan(tmp_path, capsys):
    out = tmp_path / "parts"
    assert _quantize(EXAMPLE, out, "--part", "1/1") == 0
    assert _quantize(EXAMPLE, out, "--finish", "--scheme", "FP8_DYNAMIC") == 2
    assert "another plan" in capsys.readouterr().err


def test_a_part_never_writes_into_a_folder_of_other_files(tmp_path, capsys):
    out = tmp_path / "work"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _quantize(EXAMPLE, out, "--part", "1/2") == 2
    assert "notes.txt" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--part", "3/2"], "between 1 and N"),
        (["--part", "two"], "give I/N"),
        (["--part", "1/2", "--finish"], "do not go together"),
        (["--part", "1/2", "--overwrite"], "do not go together"),
        (["--ray-address", "127.0.0.1:1"], "goes with --ray"),
    ],
)
def test_bad_split_options_are_one_line(tmp_path, capsys, args, needle):
    assert _quantize(EXAMPLE, tmp_path / "o", *args) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_each_hub_part_downloads_only_the_shards_it_reads(hub, models, tmp_path):
    hub.add("org/m", models["llama-sharded"])
    plan = planner.build(open_checkpoint(models["llama-sharded"]), plan_options())
    jobs = shard_jobs(plan, 300_000)
    home, out = tmp_path / "hf", tmp_path / "out"
    fetched = []
    for i, mine in enumerate(parts.assign(jobs, 3), start=1):
        hub.log.clear()
        r = qcli(hub, home / str(i), "quantize", "org/m", str(out), "--part", f"{i}/3", "-q",
                 "--max-shard-size", "300KB")  # fmt: skip
        assert r.returncode == 0, r.stderr
        got = {s.path.rsplit("/", 1)[1] for s in hub.log
               if s.path.endswith(".safetensors") and s.status == 200}  # fmt: skip
        assert got == {f.name for f in parts.source_files(mine)}
        fetched.append(got)
    everything = {f.name for f in plan.checkpoint.files}
    assert any(got < everything for got in fetched)  # a part that did not need every shard
    r = qcli(hub, home / "1", "quantize", "org/m", str(out), "--finish", "-q",
             "--max-shard-size", "300KB")  # fmt: skip
    assert r.returncode == 0, r.stderr
    plain = tmp_path / "plain"
    r = qcli(hub, home / "1", "quantize", "org/m", str(plain), "-q", "--max-shard-size", "300KB")
    assert r.returncode == 0, r.stderr
    _same_files(plain, out)


# --- Ray -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local Ray cluster on 127.0.0.1 with two workers (two CPUs, one per task)."""
    pytest.importorskip("ray")
    port = str(6400 + os.getpid() % 500)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    start = ray + ["start", "--head", "--node-ip-address", "127.0.0.1", "--port", port]
    start += ["--num-cpus", "2", "--include-dashboard=false", "--disable-usage-stats"]
    subprocess.run(start, check=True, capture_output=True, env=env, timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run(ray + ["stop", "--force"], capture_output=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """~0.5 GB of bf16 in nine 64 MB output shards: each takes long enough to be killed."""
    dest = tmp_path_factory.mktemp("big") / "llama"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "make_checkpoint.py"
    subprocess.run([sys.executable, str(script), "--preset", "2g", "--layers", "2", str(dest)],
                   check=True, capture_output=True, timeout=600)  # fmt: skip
    return dest


def _ray_quantize(src: Path, out: Path, address: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "import sys; from qcli.cli import main; sys.exit(main())"]
    cmd += ["quantize", str(src), str(out), "--ray", "--ray-address", address, "-q", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_ray_run_equals_a_plain_run(ray_cluster, plain, tmp_path):
    out = tmp_path / "ray"
    p = _ray_quantize(EXAMPLE, out, ray_cluster, "--lm-head", "--max-shard-size", SHARD)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    _same_files(plain, out)


def _writer_of(path: Path) -> int | None:
    """The process that has `path` open (a Ray worker writing a shard)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                    return int(pid)
        except OSError:
            continue
    return None


@pytest.mark.slow
def test_ray_retries_a_killed_worker(ray_cluster, big, tmp_path):
    out = tmp_path / "ray"
    p = _ray_quantize(big, out, ray_cluster, "--max-shard-size", "64MB")
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and p.poll() is None and time.monotonic() < deadline:
        for tmp in out.glob(f".*{parts.TMP_SUFFIX}") if out.is_dir() else []:
            pid = _writer_of(tmp.resolve())
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed = tmp.name
                break
        time.sleep(0.002)
    _, err = p.communicate(timeout=900)
    assert killed is not None, "no worker was caught writing a shard"
    assert p.returncode == 0, err
    plain = tmp_path / "plain"
    assert main(["quantize", str(big), str(plain), "-q", "--max-shard-size", "64MB"]) == 0
    _same_files(plain, out)
    shutil.rmtree(plain)
