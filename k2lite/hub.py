"""Models by Hugging Face id: `k2lite.load("moonshotai/Kimi-K2-Thinking")`, `-m org/name`.

An id resolves from the local Hugging Face cache, offline, laid out as huggingface_hub writes it:

    $HF_HUB_CACHE (else $HF_HOME/hub, else ~/.cache/huggingface/hub)
      models--moonshotai--Kimi-K2-Thinking/
        refs/main                  the commit hash "main" points at
        snapshots/<commit>/        config.json, *.safetensors, ... (links into blobs/)

`revision` is a branch or tag name (read from refs/) or a commit hash (a snapshots/ folder).
`download()` fetches a model into that cache through huggingface_hub (`k2lite download ID`);
nothing else here needs it or the network.
"""
from __future__ import annotations

import os
import re

from .errors import ModelFormatError

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_cache() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(home, "hub")


def is_repo_id(name: str) -> bool:
    """"org/name" that is not a path on this machine."""
    return bool(REPO_ID.fullmatch(name)) and not os.path.exists(name) and ".." not in name


def resolve(name: str, revision: str | None = None) -> str:
    """The checkpoint folder for `name`: itself if it is a path (or not an id), else the
    cached snapshot of that Hugging Face repo at `revision` (default: main)."""
    if not is_repo_id(name):
        if revision:
            raise ModelFormatError(f"{name}: --revision applies to Hugging Face ids (org/name) only")
        return name
    cache = hub_cache()
    repo = os.path.join(cache, "models--" + name.replace("/", "--"))
    get = f"k2lite download {name}" + (f" --revision {revision}" if revision else "")
    if not os.path.isdir(repo):
        raise ModelFormatError(f"{name}: no such folder, and not in the Hugging Face cache {cache}: {get}")
    rev = revision or "main"
    ref = os.path.join(repo, "refs", rev)
    if os.path.isfile(ref):
        with open(ref, encoding="ascii") as f:
            commit = f.read().strip()
    elif re.fullmatch(r"[0-9a-f]{40}", rev):
        commit = rev
    else:
        raise ModelFormatError(f"{name}: revision {rev!r} is not in the Hugging Face cache {cache}: {get}")
    snap = os.path.join(repo, "snapshots", commit)
    if not os.path.isfile(os.path.join(snap, "config.json")):
        raise ModelFormatError(f"{name}: the cached snapshot {snap} has no config.json (an incomplete "
                               f"download?): {get}")
    return snap


def download(name: str, revision: str | None = None, include=None) -> str:
    """Fetch `name` into the Hugging Face cache (resumable, with progress bars); its folder."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise RuntimeError("downloading needs huggingface_hub: pip install huggingface_hub "
                           f"(or put the model in {hub_cache()} yourself)") from None
    if not REPO_ID.fullmatch(name):
        raise ValueError(f"{name!r} is not a Hugging Face model id (org/name)")
    return snapshot_download(name, revision=revision, allow_patterns=list(include) or None)
