"""A hub repo id as a Checkpoint, without downloading its weights.

`inspect` and `quantize --dry-run` need config.json and every safetensors header, never the
weights. Small JSON files (config.json, the shard index) come through ``hf_hub_download``, so
they land in the standard cache and work offline later. A shard's header comes from HTTP range
requests made with huggingface_hub's own session, URL and auth helpers (what its
``get_safetensors_metadata`` does), except that qcli keeps the header's length and the file's
size: the headers then go through exactly the validation of a local file (qcli.tensors), and
every tensor's offsets are the real ones. A shard already in the cache is read from disk, and
fetched headers are kept (see header_cache_file); with HF_HUB_OFFLINE=1 only those are used.

Every read uses the commit that config.json resolved to, so config and headers always come
from the same revision, and the commit is reported.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from qcli.errors import CheckpointError, InputError
from qcli.tensors import (
    INDEX_NAME,
    SINGLE_NAME,
    Checkpoint,
    TensorInfo,
    header_length,
    open_checkpoint,
    parse_header,
    read_header,
)

# huggingface_hub's own choice: 97% of hub headers fit in the first 100 kB, so one request
# usually suffices; a larger header takes exactly one more.
FIRST_RANGE = 100_000
# Concurrent header requests for sharded repos (each is one small round trip).
MAX_WORKERS = 8
_CONTENT_RANGE = re.compile(r"bytes\s+\d+-\d+/(\d+)")

Header = tuple[dict[str, str], dict[str, TensorInfo]]


@dataclass
class HubCheckpoint:
    """A repo's checkpoint known from its headers, and where they came from."""

    checkpoint: Checkpoint
    repo_id: str
    commit: str
    remote_files: list[str] = field(default_factory=list)  # headers read over HTTP
    cached_files: list[str] = field(default_factory=list)  # headers read from the local cache


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), as huggingface_hub itself reads it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


# A hub that cannot be reached at all is known after one request without retries; only then
# does qcli fall back to the local cache. (huggingface_hub's own downloads retry a network
# error five times, printing a line each time, before they look in the cache: ~25 s.)
PROBE_TIMEOUT = 5.0


def reachable(repo_id: str, revision: str | None, token: str | None) -> bool:
    """Whether the hub answers at all: False on a network error (no DNS, refused, timeout).

    Any HTTP answer, an error status included, counts as reachable: the real request that
    follows reports a missing repo or a gated one in its own words."""
    if offline():
        return False
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError, HTTPError

    url = hf_hub_url(repo_id, "config.json", revision=revision)
    timeout = min(PROBE_TIMEOUT, float(constants.HF_HUB_ETAG_TIMEOUT))
    try:
        get_hf_file_metadata(url, token=token, timeout=timeout)
    except HfHubHTTPError:
        return True
    except (HTTPError, OSError):
        return False
    return True


def open_repo(repo_id: str, revision: str | None = None, token: str | None = None) -> HubCheckpoint:
    """config.json, the index and every header of `repo_id` at `revision`; no weights."""
    with hub_errors(repo_id, revision):
        from huggingface_hub import hf_hub_download

        local = not reachable(repo_id, revision, token)
        try:
            config = Path(
                hf_hub_download(
                    repo_id, "config.json", revision=revision, token=token, local_files_only=local
                )
            )
        except _remote_missing():
            raise InputError(
                f"{repo_id}: no config.json (not a transformers model repo?)"
            ) from None
        folder = config.parent
        # snapshot folders are named by commit: pin every later read to it.
        commit = folder.name
        reader = _HeaderReader(repo_id, commit, token, folder, local)
        index = _index(repo_id, commit, token, folder, local)
        if index is not None:
            import json

            wmap = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
            names = sorted({v for v in wmap.values() if isinstance(v, str)})
            reader.prefetch([folder / n for n in names])
            ck = open_checkpoint(folder, read=reader)
        else:
            # transformers reads model.safetensors when a repo has no index; so does qcli.
            ck = open_checkpoint(folder, read=reader, weight_files=[folder / SINGLE_NAME])
    return HubCheckpoint(ck, repo_id, commit, sorted(reader.remote), sorted(reader.cached))


def _index(repo_id: str, commit: str, token: str | None, folder: Path, local: bool) -> Path | None:
    """The cached shard index, fetched if needed; None when the repo has a single file."""
    from huggingface_hub import hf_hub_download

    if (folder / INDEX_NAME).is_file():
        return folder / INDEX_NAME
    if local:
        # Offline, an uncached index and no index look alike: the single file decides.
        return None
    try:
        return Path(hf_hub_download(repo_id, INDEX_NAME, revision=commit, token=token))
    except _remote_missing():
        return None


def _remote_missing() -> type[Exception]:
    """The error for a file the hub says is absent (not one missing from the local cache)."""
    from huggingface_hub.errors import RemoteEntryNotFoundError

    return RemoteEntryNotFoundError


class _HeaderReader:
    """qcli.tensors.HeaderReader for one repo commit: the cache first, then range requests."""

    def __init__(self, repo_id: str, commit: str, token: str | None, folder: Path, local: bool):
        self.repo_id, self.commit, self.token, self.folder = repo_id, commit, token, folder
        self.local = local  # offline, or the hub cannot be reached: the cache only
        self.remote: set[str] = set()
        self.cached: set[str] = set()
        self._fetched: dict[str, Header] = {}

    def __call__(self, path: Path) -> Header:
        if path.is_file():  # the weights are in the cache (e.g. an earlier quantize run)
            self.cached.add(path.name)
            return read_header(path)
        if path.name not in self._fetched:
            self._fetched[path.name] = self._fetch(path)
        return self._fetched[path.name]

    def prefetch(self, paths: Sequence[Path]) -> None:
        """Fetch the headers not in the cache concurrently: 100 shards are 100 round trips."""
        todo = [p for p in paths if not p.is_file()]
        if len(todo) < 2:
            return
        with ThreadPoolExecutor(min(MAX_WORKERS, len(todo))) as pool:
            for p, header in zip(todo, pool.map(self._fetch, todo), strict=True):
                self._fetched[p.name] = header

    def _fetch(self, path: Path) -> Header:
        name = path.name
        saved = header_cache_file(self.repo_id, self.commit, name)
        kept = _load_saved(saved)
        if kept is not None:
            self.cached.add(name)
            data, size = kept
            return parse_header(path, data[8:], size)
        if self.local:
            raise InputError(
                f"{self.repo_id}: the header of {name} is not in the local cache and the hub"
                " cannot be reached (offline: run once online, or download the weights)"
            )
        try:
            data, size = self._get_range(name, 0, FIRST_RANGE - 1)
        except _remote_missing():
            raise CheckpointError(
                f"{self.repo_id}: no {name} at commit {self.commit[:12]} (qcli reads safetensors"
                " weights only)"
            ) from None
        hlen = header_length(name, data, size)
        if len(data) < 8 + hlen:
            more, _ = self._get_range(name, len(data), 8 + hlen - 1)
            data += more
        if len(data) < 8 + hlen:
            raise CheckpointError(
                f"{name}: the hub sent {len(data)} bytes of an {hlen}-byte header"
            )
        data = data[: 8 + hlen]
        header = parse_header(path, data[8:], size)  # validate before keeping it
        _save(saved, data, size)
        self.remote.add(name)
        return header

    def _get_range(self, name: str, start: int, end: int) -> tuple[bytes, int]:
        """Bytes [start, end] of a file at the pinned commit, and the file's full size."""
        from huggingface_hub import get_session, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

        url = hf_hub_url(self.repo_id, name, revision=self.commit)
        headers = build_hf_headers(token=self.token)
        # A compressed body would hide the file's size and break byte ranges.
        headers.update({"Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"})
        response = get_session().get(url, headers=headers, timeout=_timeout())
        hf_raise_for_status(response)
        body = response.content
        if response.status_code == 206:
            m = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not m:
                raise CheckpointError(f"{name}: the hub's range answer has no file size")
            return body, int(m.group(1))
        # 200: the server ignored the range and sent the whole file; its length is the size.
        return body[start : end + 1], len(body)


def header_cache_file(repo_id: str, commit: str, name: str) -> Path:
    """Where a fetched header is kept, so `inspect` works offline after one online run.

    A commit's files never change, so entries never go stale (qcli.cache says where).
    """
    from qcli import cache

    repo = "models--" + repo_id.replace("/", "--")
    return cache.root() / "headers" / repo / commit / (name + ".header")


def _load_saved(path: Path) -> tuple[bytes, int] | None:
    """(8-byte length + header, file size) from a kept header; None when absent or damaged."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if len(raw) < 16:
        return None
    size, hlen = struct.unpack("<QQ", raw[:16])
    if len(raw) != 16 + hlen or hlen > size:
        return None  # not what _save wrote: fetch it again
    return raw[8:], size


def _save(path: Path, data: bytes, size: int) -> None:
    # Best effort: a read-only home must not fail an inspect that already has its answer.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(struct.pack("<Q", size) + data)
        os.replace(tmp, path)
    except OSError:
        pass


def _timeout() -> float:
    from huggingface_hub import constants

    return float(constants.HF_HUB_DOWNLOAD_TIMEOUT)


@contextmanager
def hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """huggingface_hub's exceptions as one-line InputErrors (exit code 2)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except GatedRepoError:
        raise InputError(f"{repo_id}: gated repo; accept its terms and pass --token") from None
    except RepositoryNotFoundError:
        raise InputError(
            f"{repo_id}: no such repo on the hub (or it is private: --token)"
        ) from None
    except RevisionNotFoundError:
        raise InputError(f"{repo_id}: no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        raise InputError(
            f"{repo_id}{'@' + revision if revision else ''}: not in the local cache and the hub"
            " cannot be reached (offline: HF_HUB_OFFLINE=1, or no network)"
        ) from None
    except HfHubHTTPError as e:
        raise InputError(f"{repo_id}: hub request failed ({_first_line(e)})") from None
    except (HTTPError, OSError) as e:  # connection refused, timeout, DNS
        raise InputError(f"{repo_id}: cannot reach the hub ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
