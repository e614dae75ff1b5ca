"""Where qcli keeps what it can reuse: fetched hub headers, eval's reference log-probabilities.

``$QCLI_CACHE_DIR``, else ``$XDG_CACHE_HOME/qcli``, else ``~/.cache/qcli``. Kept apart from
huggingface_hub's cache, whose layout and tools (``hf cache``) know only its own files.
"""

from __future__ import annotations

import os
from pathlib import Path


def root() -> Path:
    return Path(
        os.environ.get("QCLI_CACHE_DIR")
        or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qcli")
    )
