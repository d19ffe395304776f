"""Incremental builds: what the earlier builds a build names (`build.previous`) already hold.

    earlier = load_earlier(storage, ["web-2026-11"])       # on the driver, when the plan is frozen
    earlier.skips(input_id)                                  # planned inputs already built: left out of the plan
    earlier.hashes                                           # sorted digests: the decode stage drops repeats

Builds are immutable, so new data is a new build that holds only what no earlier build holds (docs/INTERFACES.md
§2): an input whose `input_id` an earlier manifest lists is left out of the plan, and an input whose decoded pixels
(`sha256`) an earlier build kept is dropped as `duplicate` (a copy under a new name or URL). Earlier builds must be
final (their `manifest/_final.json` written), and they are followed transitively: a build that names v2 also
excludes what v2's own plan named (v1), so a chain of incremental builds names only its last link.

Which listed inputs count as built: every kept one, and every dropped one except `failed_to_download` (a URL that
timed out or answered 500 may answer next time: a later build tries it again). The plan freezes each earlier
build's URI and manifest digest; a rerun reloads them and refuses if one changed, so a resumed build excludes
exactly what its first run excluded.
"""

from __future__ import annotations

import bisect
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from onegen.dataset import open_build
from onegen.errors import UsageError
from onegen.shards import plan_path
from onegen.storage import Storage

RETRIED_REASONS = ("failed_to_download",)  # drops a later build tries again
_HASH_BYTES = 16  # of the sha256: 128 bits, collisions out of reach at any build size, 16 MB per million samples


@dataclass
class EarlierBuilds:
    builds: list[dict[str, str]] = field(default_factory=list)  # [{"name", "uri", "manifest_sha256"}], in order
    input_ids: set[str] = field(default_factory=set)
    hashes: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=f"V{_HASH_BYTES}"))
    skipped: Counter = field(default_factory=Counter)  # {source: planned inputs (tars: whole tars) left out}
    _sorted: list[str] | None = None

    def __bool__(self) -> bool:
        return bool(self.builds)

    def skips(self, input_id: str) -> bool:
        """Whether an input is built already. `input_id` may also be a container prefix ending in '/' (a tar's
        f"{uri}#{size}:{version}/"): built when some earlier input id starts with it."""
        if input_id.endswith("/") and "#" in input_id:
            if self._sorted is None:
                self._sorted = sorted(self.input_ids)
            at = bisect.bisect_left(self._sorted, input_id)
            return at < len(self._sorted) and self._sorted[at].startswith(input_id)
        return input_id in self.input_ids

    def skipper(self, source: str) -> Callable[[str], bool]:
        """`skips`, counting what it leaves out under the source's name (the plan records the counts)."""
        def skip(input_id: str) -> bool:
            hit = self.skips(input_id)
            self.skipped[source] += hit
            return hit

        return skip


def load_earlier(storage: Storage, refs: list[str], frozen: list[dict[str, str]] | None = None,
                 own: str | None = None) -> EarlierBuilds:
    """The earlier builds `refs` name (bare names under `storage`'s root, or full build URIs) and, transitively,
    the builds their plans name. `frozen` (a rerun): the builds the plan recorded, reloaded by URI and checked
    against their recorded manifest digests; `own`: the URI of the build being planned, which cannot be its own
    earlier build. UsageError naming the build and the fix when one is missing or not final, or changed since the
    plan."""
    earlier = EarlierBuilds()
    seen: set[str] = set()
    digests: list[np.ndarray] = []
    # (reference, who named it): build.previous, or an earlier build's plan (the chain)
    pending = [(item["uri"], "this build's plan") for item in frozen] if frozen is not None else \
        [(ref, "build.previous") for ref in refs]
    while pending:
        ref, named_by = pending.pop(0)
        build = _open(ref, storage, named_by)
        if build.uri in seen:
            continue
        seen.add(build.uri)
        if build.uri == own:
            raise UsageError(f"{named_by} names {ref!r}, the build being made ({own}): name the builds before it")
        try:
            digest = build.manifest_digest()  # reads the final manifest (once)
        except FileNotFoundError:
            raise UsageError(f"earlier build {build.uri} (named by {named_by}) has not finished (no "
                             "manifest/_final.json): finish it by rerunning its `onegen build`, or leave it out of "
                             "build.previous") from None
        earlier.builds.append({"name": build.name, "uri": build.uri, "manifest_sha256": digest})
        for entry in build.entries().values():
            earlier.input_ids.update(entry["input_ids"])
            earlier.input_ids.update(input_id for input_id, reason in entry.get("dropped_input_ids", [])
                                     if reason not in RETRIED_REASONS)
            digests.append(hash_keys(entry["sha256"]))
        if frozen is None:  # the first run follows the chain; a rerun has it in its plan already
            pending += [(item["uri"], f"the plan of {build.name}") for item in _plan_previous(build)]
    if frozen is not None:
        now = {b["uri"]: b["manifest_sha256"] for b in earlier.builds}
        changed = [item["uri"] for item in frozen if now.get(item["uri"]) != item["manifest_sha256"]]
        if changed:
            raise UsageError(f"earlier builds {', '.join(changed)} are not the ones this build's plan excluded "
                             "(their manifests changed); builds are immutable: restore them, or start this build "
                             "afresh under a new name")
    if digests:
        earlier.hashes = np.unique(np.concatenate(digests))
    return earlier


def _open(ref: str, storage: Storage, named_by: str):
    try:
        return open_build(ref, storage.root_uri)
    except FileNotFoundError as err:
        raise UsageError(f"{named_by} names {ref!r}, which is no build: {err}") from None


def _plan_previous(build) -> list[dict[str, str]]:
    rel = plan_path(build.name)
    if not build.storage.exists(rel):
        return []
    return json.loads(build.storage.read_bytes(rel)).get("previous", [])


def hash_keys(hexdigests: list[str]) -> np.ndarray:
    """The leading bytes of sha256 hex digests as sortable fixed-size keys (numpy void), for `np.isin`-style lookup."""
    raw = b"".join(bytes.fromhex(digest[:2 * _HASH_BYTES]) for digest in hexdigests)
    return np.frombuffer(raw, dtype=f"V{_HASH_BYTES}").copy()


def already_built(hashes: np.ndarray, hexdigest: str) -> bool:
    """Whether `hexdigest` is among the sorted `hashes` (an EarlierBuilds.hashes)."""
    if not len(hashes):
        return False
    key = hash_keys([hexdigest])[0]
    at = int(np.searchsorted(hashes, key))
    return at < len(hashes) and hashes[at] == key
