"""Hub names of dictionaries, resolved to local folders with ``huggingface_hub``.

``owner/repo`` downloads the repository, ``owner/repo/sub/folder`` only that folder. Gemma
Scope's SAELens release names are rewritten to the repository and folder they live in:
``gemma-scope-2-270m-pt-transcoders/layer_5_width_16k_l0_small`` ->
``google/gemma-scope-2-270m-pt`` folder ``transcoder/layer_5_width_16k_l0_small``;
``gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_5`` -> ``google/gemma-scope-2b-pt-res``
folder ``layer_3/width_16k/average_l0_5``. Other SAELens release ids need SAELens' directory
of releases, which factfind does not ship: pass the repository instead.

Without a reachable hub every failure is one :class:`~factfind.errors.HubUnavailableError`
line naming the name and the folder to download by hand.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from factfind.errors import DictionaryFileError, HubUnavailableError

#: SAELens' Gemma Scope 2 release suffix -> the repository's folder
_GS2_DIRS = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_out",
             "transcoders": "transcoder"}


def hub_location(name: str) -> tuple[str, str | None]:
    """``(repo_id, subfolder)`` of a hub name (see the module docstring)."""
    m = re.match(r"^gemma-scope-2-(\d+(?:\.\d+)?[mb])-(pt|it)-(res|mlp|att|transcoders)(-all)?"
                 r"(?:/(.+))?$", name)
    if m:
        size, tune, kind, all_, rest = m.groups()
        top = _GS2_DIRS[kind] + ("_all" if all_ else "")
        sub = rest if rest is None or rest.startswith(top + "/") else f"{top}/{rest}"
        return f"google/gemma-scope-2-{size}-{tune}", sub or top
    m = re.match(r"^(gemma-scope-\d+(?:\.\d+)?b-(?:pt|it)-(?:res|mlp|att|transcoders))"
                 r"(?:-canonical)?(?:/(.+))?$", name)
    if m:
        return f"google/{m.group(1)}", m.group(2)
    parts = name.strip("/").split("/")
    if len(parts) < 2:
        raise DictionaryFileError(f"{name}: no such file or folder, and not a hub name "
                                  "(owner/repo[/folder]); SAELens release ids other than Gemma "
                                  "Scope's need the repository: pass owner/repo/folder",
                                  path=name)
    return "/".join(parts[:2]), "/".join(parts[2:]) or None


def resolve(source: str | os.PathLike[str], *, revision: str | None = None) -> Path:
    """A local path as is; a hub name downloaded (or found in the hub's cache)."""
    path = Path(os.path.expanduser(str(source)))
    if path.exists():
        return path
    text = str(source)
    if text.startswith((".", "/", "~")) or os.sep + os.sep in text or \
            not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)+/?", text):
        raise DictionaryFileError(f"{text!r}: no such file or folder", path=text)
    repo, sub = hub_location(text)
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo, revision=revision,
                                  allow_patterns=[f"{sub}/*", f"{sub}/**"] if sub else None)
    except Exception as e:
        raise _unavailable(text, repo, sub, e) from None
    folder = Path(local) / sub if sub else Path(local)
    if not folder.exists():
        raise HubUnavailableError(f"{text}: {repo} has no folder {sub!r}; check the name")
    return folder


def fetch_file(uri: str, *, revision: str | None = None) -> Path:
    """An ``hf://owner/repo/path/to/file[?revision=...]`` URI (circuit-tracer's configs)."""
    body, _, query = uri.removeprefix("hf://").partition("?")
    rev = dict(p.split("=", 1) for p in query.split("&") if "=" in p).get("revision", revision)
    parts = body.split("/")
    if len(parts) < 3:
        raise DictionaryFileError(f"{uri}: not an hf://owner/repo/file URI", path=uri)
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, filename, revision=rev))
    except Exception as e:
        raise _unavailable(uri, repo, filename, e) from None


def _unavailable(name: str, repo: str, sub: str | None, e: Exception) -> HubUnavailableError:
    what = type(e).__name__
    gone = ("RepositoryNotFound", "RevisionNotFound", "EntryNotFound", "GatedRepo")
    reason = "the repository or file is not there" if what.startswith(gone) \
        else "the hub could not be reached"
    get = f"huggingface-cli download {repo}" + (f" --include '{sub}/*'" if sub else "")
    return HubUnavailableError(f"{name}: {reason} ({what}); download the folder on a machine "
                               f"with network ({get}) and pass its local path")


__all__ = ["fetch_file", "hub_location", "resolve"]
