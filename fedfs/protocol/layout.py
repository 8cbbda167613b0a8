"""Every key name in a fedfs bucket, as pure functions. No I/O.

The layout groups files by *writer*, so bucket permissions can be least
privilege: a site writes only under ``sites/<site>/``, the aggregator only
under ``aggregator/``; ``federation.json`` is written once by whoever runs
``fedfs init``. Documents are JSON (``.json``), payloads are content-addressed
(``blobs/<sha256>.<ext>``). See docs/protocol.md for the full table.

Versions of the global model are integers ``v0, v1, ...`` rendered with six
digits so that a lexical listing is also a numeric one.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ..errors import InvalidName

FEDERATION = "federation.json"
SITES = "sites"
AGGREGATOR = "aggregator"

MAX_NAME = 64
MAX_KEY = 512
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_.=-]+$")
_VERSION_RE = re.compile(r"^v(\d{6,})(?:\.a[1-9]\d*)?\.json$")
_ROUND_RE = re.compile(r"^r(\d{6,})(?:\.a[1-9]\d*)?\.json$")
_SLOT_RE = re.compile(r"^(.*?)(?:\.a([1-9]\d*))?\.json$")
_BLOB_RE = re.compile(r"^((?:sites/[^/]+)|aggregator)/blobs/([0-9a-f]{64})\.([A-Za-z0-9]{1,16})$")

# Names a party may not take because they collide with layout folders or roles.
RESERVED_NAMES = frozenset({"sites", "federation", "blobs", "tmp", "doctor"})


def check_name(name: object, what: str = "site name") -> str:
    """Return ``name`` if it is a safe party name, else raise InvalidName saying why.

    Safe: 1-64 characters of letters, digits, ``_ . -``, starting with a letter
    or digit; so no ``..``, no ``/``, no absolute path, nothing empty.
    """
    if not isinstance(name, str):
        raise InvalidName(f"{what} must be a string, got {type(name).__name__}")
    if not name:
        raise InvalidName(f"{what} is empty")
    if len(name) > MAX_NAME:
        raise InvalidName(f"{what} {name[:20]!r}... is {len(name)} characters; the limit is {MAX_NAME}")
    if "/" in name or "\\" in name:
        raise InvalidName(f"{what} {name!r} contains a path separator")
    if ".." in name:
        raise InvalidName(f"{what} {name!r} contains '..'")
    if not _NAME_RE.match(name):
        raise InvalidName(
            f"{what} {name!r} may only use letters, digits, '_', '.', '-' and must start with a letter or digit"
        )
    if name.lower() in RESERVED_NAMES:
        raise InvalidName(f"{what} {name!r} is reserved")
    return name


def check_key(key: object) -> str:
    """Return ``key`` if it is a safe relative bucket key, else raise InvalidName."""
    if not isinstance(key, str) or not key:
        raise InvalidName(f"bucket key must be a non-empty string, got {key!r}")
    if len(key) > MAX_KEY:
        raise InvalidName(f"bucket key is {len(key)} characters; the limit is {MAX_KEY}")
    if key.startswith("/") or "\\" in key:
        raise InvalidName(f"bucket key {key!r} must be relative and use '/'")
    for seg in key.split("/"):
        if seg in ("", ".", "..") or not _SEGMENT_RE.match(seg):
            raise InvalidName(f"bucket key {key!r} has an unsafe segment {seg!r}")
    return key


def check_sha256(digest: object) -> str:
    if not isinstance(digest, str) or not _SHA_RE.match(digest):
        raise InvalidName(f"{digest!r} is not a lowercase hex sha256")
    return digest


def _v(version: int) -> str:
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise InvalidName(f"version must be a non-negative integer, got {version!r}")
    return f"v{version:06d}"


def _r(round_: int) -> str:
    if not isinstance(round_, int) or isinstance(round_, bool) or round_ < 0:
        raise InvalidName(f"round must be a non-negative integer, got {round_!r}")
    return f"r{round_:06d}"


# ---- per-site keys (written only by that site) -------------------------------
def site_prefix(site: str) -> str:
    return f"{SITES}/{check_name(site)}/"


def _site_file(name: str, rel: str, doc: str) -> Callable[[str], str]:
    def key(site: str) -> str:
        return site_prefix(site) + rel

    key.__name__ = key.__qualname__ = name
    key.__doc__ = doc
    return key


def _revision(base: str, revision: int) -> str:
    """``base.json`` for revision 0, ``base-N.json`` for a superseding revision N (set-up documents)."""
    if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
        raise InvalidName(f"revision must be a non-negative integer, got {revision!r}")
    return f"{base}.json" if revision == 0 else f"{base}-{revision}.json"


def site_census(site: str, revision: int = 0) -> str:
    """FFE phase 1: the site's training-case count; revision N >= 1 supersedes the ones before (before v0)."""
    return site_prefix(site) + _revision("fingerprint/census", revision)


def site_fingerprint(site: str, revision: int = 0) -> str:
    """FFE phase 2 (or AsymFedAvg): the site's fingerprint summary; revision N >= 1 supersedes (before v0)."""
    return site_prefix(site) + _revision("fingerprint/summary", revision)


site_plans = _site_file("site_plans", "plans.json", "Digest and summary of the plans the site trains with.")
site_updates_prefix = _site_file("site_updates_prefix", "updates/", "The folder of the site's update manifests.")
site_heartbeat = _site_file("site_heartbeat", "heartbeat.json", "A mutable hint: the site's phase and last sign of life.")
site_status = _site_file("site_status", "status.json",
                         "A mutable signed document: what this site rejected and why (quarantine).")


def site_update(site: str, round_: int) -> str:
    """The manifest of the site's ``round_``-th update (it names its base version)."""
    return site_prefix(site) + f"updates/{_r(round_)}.json"


def site_blob(site: str, sha256: str, ext: str = "safetensors") -> str:
    return site_prefix(site) + f"blobs/{check_sha256(sha256)}.{ext}"


# ---- aggregator keys ----------------------------------------------------------
AGG_PREFIX = f"{AGGREGATOR}/"
CENSUS = AGG_PREFIX + "fingerprint/census.json"
GLOBAL_FINGERPRINT = AGG_PREFIX + "fingerprint/global.json"
LATEST = AGG_PREFIX + "latest.json"
AGG_STATUS = AGG_PREFIX + "status.json"
#: A mutable hint: the aggregator's phase and last sign of life (as a site's heartbeat.json).
AGG_HEARTBEAT = AGG_PREFIX + "heartbeat.json"
GLOBALS_PREFIX = AGG_PREFIX + "globals/"


#: Hints for the aggregator's constant-cost poll: a site drops ``inbox/<site>.rNNNNNN`` (empty,
#: unsigned) after publishing that update; the aggregator lists ``inbox/`` once per poll (1,000
#: markers per S3 LIST request), probes only those sites, and deletes the markers it read. A lost
#: marker only delays: the aggregator also probes every site now and then (``FULL_SCAN_EVERY_S``).
INBOX = "inbox/"
_MARKER_RE = re.compile(r"^inbox/([A-Za-z0-9][A-Za-z0-9_.-]*)\.r(\d{6,})$")


def inbox_marker(site: str, round_: int) -> str:
    """The marker a site drops after publishing its ``round_``-th update."""
    return f"{INBOX}{check_name(site)}.{_r(round_)}"


def parse_inbox_marker(key: str) -> tuple[str, int] | None:
    """``inbox/A.r000003`` -> ("A", 3); None for anything else (junk in the inbox is ignored)."""
    m = _MARKER_RE.match(key) if isinstance(key, str) else None
    if not m:
        return None
    try:
        return check_name(m.group(1)), int(m.group(2))
    except InvalidName:
        return None


def global_version(version: int) -> str:
    """The manifest of global model ``version`` (v0 is the initial model)."""
    return GLOBALS_PREFIX + f"{_v(version)}.json"


def census_key(revision: int = 0) -> str:
    """The merged census; revision N >= 1 supersedes the ones before (a site superseded its census)."""
    return AGG_PREFIX + _revision("fingerprint/census", revision)


def global_fingerprint_key(revision: int = 0) -> str:
    """The merged fingerprint; revision N >= 1 supersedes the ones before (a site superseded its summary)."""
    return AGG_PREFIX + _revision("fingerprint/global", revision)


def aggregator_blob(sha256: str, ext: str = "safetensors") -> str:
    return AGG_PREFIX + f"blobs/{check_sha256(sha256)}.{ext}"


# ---- parsing -------------------------------------------------------------------
def parse_version_key(key: str) -> int | None:
    """``aggregator/globals/v000012.json`` -> 12; None for anything else."""
    if not key.startswith(GLOBALS_PREFIX):
        return None
    m = _VERSION_RE.match(key[len(GLOBALS_PREFIX):])
    return int(m.group(1)) if m else None


def parse_update_key(key: str) -> tuple[str, int] | None:
    """``sites/A/updates/r000003.json`` -> ("A", 3); None for anything else."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != SITES or parts[2] != "updates":
        return None
    m = _ROUND_RE.match(parts[3])
    if not m:
        return None
    try:
        site = check_name(parts[1])
    except InvalidName:
        return None
    return site, int(m.group(1))


def parse_blob_key(key: str) -> tuple[str, str, str] | None:
    """``sites/A/blobs/<sha>.safetensors`` -> ("sites/A", sha, "safetensors"); None for a non-blob key.

    The one rule for payload keys: under its writer's prefix, named by its sha256."""
    m = _BLOB_RE.match(key) if isinstance(key, str) else None
    return (m.group(1), m.group(2), m.group(3)) if m else None


# ---- slots: write-once keys nobody can squat ------------------------------------
#: The write-once documents a party must be able to publish whatever lies in the bucket:
#: a site's plans and updates, the aggregator's globals. Each key is a *slot*: the key
#: itself, then numbered alternatives beside it (``r000003.json``, ``r000003.a1.json``,
#: ``r000003.a2.json``, ...). Its value is the first candidate that verifies; readers stop
#: at the first missing one, and a writer whose exclusive publish meets a file that does
#: not verify moves to the next. Round and version numbers never change, so junk at a
#: predictable key costs a rejection (and one probe per poll), never a party.
MAX_ALTERNATIVES = 10_000


def is_slot(key: str) -> bool:
    """Whether ``key`` (a primary key or an alternative) belongs to a squat-proof slot."""
    if parse_update_key(key) is not None or parse_version_key(key) is not None:
        return True
    parts = key.split("/")
    return len(parts) == 3 and parts[0] == SITES and _SLOT_RE.match(parts[2]) is not None \
        and _SLOT_RE.match(parts[2]).group(1) == "plans"


def slot_primary(key: str) -> str:
    """``.../r000003.a2.json`` -> ``.../r000003.json`` (any other key unchanged)."""
    head, _, name = key.rpartition("/")
    m = _SLOT_RE.match(name)
    if not m or m.group(2) is None:
        return key
    return f"{head}/{m.group(1)}.json" if head else f"{m.group(1)}.json"


def slot_candidate(key: str, n: int) -> str:
    """The ``n``-th candidate of ``key``'s slot: the primary key for 0, else ``<stem>.a<n>.json``."""
    primary = slot_primary(key)
    if n == 0:
        return primary
    if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= MAX_ALTERNATIVES:
        raise InvalidName(f"slot alternative must be 1..{MAX_ALTERNATIVES}, got {n!r}")
    return f"{primary[:-len('.json')]}.a{n}.json"


def slot_index(key: str) -> int:
    """Which candidate of its slot ``key`` is (0 for the primary key)."""
    m = _SLOT_RE.match(key.rpartition("/")[2])
    return int(m.group(2)) if m and m.group(2) else 0


def newest_version(hint: int | None, exists: Callable[[str], bool]) -> int | None:
    """The newest published global: from the ``latest`` hint (None if absent or unusable), probe
    ``exists`` forward, since the hint may lag a crash. One probe when the hint is current; None before v0."""
    v = hint if isinstance(hint, int) and not isinstance(hint, bool) and hint >= 0 else -1
    while exists(global_version(v + 1)):
        v += 1
    return None if v < 0 else v


def newest_revision(key_of: Callable[[int], str], known: int | None, exists: Callable[[str], bool]) -> int | None:
    """The newest revision of a superseding set-up document (``key_of(n)``), probing forward from
    ``known`` (the newest one seen before; None: none seen). One probe when ``known`` is current."""
    n = -1 if known is None else known
    while exists(key_of(n + 1)):
        n += 1
    return None if n < 0 else n


_REVISION_RE = re.compile(r"^(.+/fingerprint/(?:census|summary|global))-([1-9]\d*)\.json$")


def revision_zero(key: str) -> str:
    """``.../fingerprint/census-3.json`` -> ``.../fingerprint/census.json`` (the family's first key);
    any other key unchanged. Readers that know documents by key use it for superseding revisions."""
    m = _REVISION_RE.match(key) if isinstance(key, str) else None
    return f"{m.group(1)}.json" if m else key


def all_revisions(key_of: Callable[[int], str], exists: Callable[[str], bool]) -> list[str]:
    """Every published revision's key of ``key_of``'s family, oldest first (bundles carry them all)."""
    newest = newest_revision(key_of, None, exists)
    return [] if newest is None else [key_of(n) for n in range(newest + 1)]


def writer_of(key: str) -> tuple[str, str] | None:
    """Which party may write ``key``: ("site", name), ("aggregator", "") or None (federation.json)."""
    parts = key.split("/")
    if parts[0] == SITES and len(parts) > 2:
        return ("site", parts[1])
    if parts[0] == AGGREGATOR:
        return ("aggregator", "")
    return None
