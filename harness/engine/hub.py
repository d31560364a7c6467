"""The Hugging Face hub, reachable or not: a file a run will fetch from the hub (a model's
``config.json``, a dataset's ``data.zip``) is checked in seconds, before anything loads.

transformers and ``huggingface_hub`` retry an unreachable hub five times with back-off (about 30 s)
and end with a generic message; ``check_hub_file`` asks the hub once, with a short timeout:

* reachable: nothing to do (the download or the cache check happens as usual);
* unreachable (no network, DNS failure, ``HF_HUB_OFFLINE=1``) and the file is in the local hub cache:
  the process switches ``huggingface_hub`` to offline mode, so loading reads the cache at once
  (a warning says so);
* unreachable and not cached, gated (401/403) and not cached, or absent (404): ``ConfigError`` in two
  lines, what was asked for and why it failed, then the settings that avoid the hub.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

#: seconds to wait for the hub's answer to one HEAD request
PROBE_TIMEOUT_S = 5.0
#: files found reachable in this process, by (repo, file, revision, repo type, endpoint)
_AVAILABLE: set = set()


def cached_file(repo_id: str, filename: str, revision: str | None = None, repo_type: str = "model") -> str | None:
    """The path of ``filename`` of ``repo_id`` at ``revision`` (default main) in the local hub cache
    (``HF_HUB_CACHE``), or None where it is not there. Reads no network."""
    from huggingface_hub import try_to_load_from_cache
    try:
        found = try_to_load_from_cache(repo_id, filename, revision=revision or None, repo_type=repo_type)
    except Exception:   # noqa: BLE001 - a malformed id or cache: not cached
        return None
    return found if isinstance(found, str) else None


def probe(repo_id: str, filename: str, revision: str | None = None, repo_type: str = "model") -> int | str:
    """One HEAD request for ``filename`` of ``repo_id`` (no retries, no redirects followed: the hub
    answers a file on a CDN with a redirect, which means reachable; ``PROBE_TIMEOUT_S``): the HTTP
    status, or the hub's ``X-Error-Code`` where it gives one (``RepoNotFound``, ``GatedRepo``,
    ``RevisionNotFound``, ``EntryNotFound``: the hub answers 401 for a repository that does not exist
    when no token is sent), or the name of the error where the hub could not be reached (``"offline"``
    under ``HF_HUB_OFFLINE``)."""
    from urllib.parse import quote

    from huggingface_hub import constants, get_session
    from huggingface_hub.utils import build_hf_headers
    if constants.HF_HUB_OFFLINE:
        return "offline"
    prefix = {"model": ""}.get(repo_type, f"{repo_type}s/")   # the hub's URL layout: /datasets/<id>/resolve/...
    url = f"{constants.ENDPOINT}/{prefix}{repo_id}/resolve/{quote(revision or 'main', safe='')}/{quote(filename)}"
    try:
        response = get_session().head(url, headers=build_hf_headers(), timeout=PROBE_TIMEOUT_S,
                                      follow_redirects=False)
    except Exception as error:   # noqa: BLE001 - DNS failure, refused, timeout, proxy: all "unreachable"
        return f"unreachable: {type(error).__name__}"
    code = response.headers.get("X-Error-Code")
    return code if code and response.status_code >= 400 else int(response.status_code)


def go_offline(reason: str) -> None:
    """Make this process read the hub cache only (``HF_HUB_OFFLINE``), so that loading a cached model
    or file does not wait for an unreachable hub."""
    from huggingface_hub import constants
    if not constants.HF_HUB_OFFLINE:
        log.warning("the Hugging Face hub cannot be reached (%s): using the local hub cache only (HF_HUB_OFFLINE=1)",
                    reason)
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"


def check_hub_file(repo_id: str, filename: str, revision: str | None, setting: str, instead: str,
                   repo_type: str = "model") -> None:
    """Check, before anything loads, that ``filename`` of ``repo_id`` can be had: from the hub, or from
    the local hub cache where the hub cannot be reached (then ``go_offline``).

    ``setting`` names the user's setting (``model.name_or_path='meta-llama/...'``); ``instead`` is the
    fix that avoids the hub (a local folder or file). Raises ``methods.ConfigError`` in two lines
    (the problem, then ``fix: ...``) for a file that is neither reachable nor cached, a gated
    repository without access, or a repository or revision that does not exist."""
    from huggingface_hub import constants

    from methods import ConfigError
    key = (repo_id, filename, revision, repo_type, constants.ENDPOINT)
    if key in _AVAILABLE:   # checked in this process already (plan, then load_model): not asked twice
        return
    cached = cached_file(repo_id, filename, revision, repo_type)
    status = probe(repo_id, filename, revision, repo_type)
    where = f"{repo_type} {repo_id}" + (f" at revision {revision}" if revision else "")
    if isinstance(status, int) and status < 400:
        _AVAILABLE.add(key)
        return
    if status == "offline" or str(status).startswith("unreachable"):
        if cached:
            go_offline(status)
            return
        why = ("HF_HUB_OFFLINE is set" if status == "offline" else
               f"{constants.ENDPOINT} cannot be reached ({status.removeprefix('unreachable: ')})")
        raise ConfigError(f"{setting}: {filename} of the hub {where} is not in the local hub cache "
                          f"({constants.HF_HUB_CACHE}) and {why}.\n"
                          f"fix: {instead}; or download it where there is network (`hf download {repo_id}"
                          f"{' --repo-type dataset' if repo_type == 'dataset' else ''}`) and set HF_HOME to that cache")
    if status in ("RepoNotFound", "RevisionNotFound", "EntryNotFound", 404):
        if cached:   # gone from the hub (or hidden): what the cache holds is what can load
            go_offline(f"{status}")
            return
        what = {"RepoNotFound": f"the hub has no {where} (or it is private and no token is set)",
                "RevisionNotFound": f"the hub has no such revision of {repo_type} {repo_id}"}.get(
            status, f"the hub has no {filename} in {where}")
        raise ConfigError(f"{setting}: {what} ({status}).\nfix: check the id and revision; or {instead}")
    if status in ("GatedRepo", 401, 403):
        if cached:
            go_offline(f"HTTP {status}")
            return
        raise ConfigError(f"{setting}: the hub {where} is gated or private ({status}), and it is not in the local "
                          f"hub cache.\nfix: accept its licence on {constants.ENDPOINT}/{repo_id} and set HF_TOKEN "
                          f"(or `hf auth login`); or {instead}")
    if not cached:   # another answer (5xx, ...): loading will tell; say what the hub said
        log.warning("the hub answered %s for %s of %s; loading will try anyway", status, filename, where)
