"""The concrete documents of the fedfs protocol (bodies; see :mod:`fedfs.trust.signing`
for the signed envelope around them). Pure: no I/O.

Field-by-field descriptions are in docs/protocol.md; keep the two in step.
"""

from __future__ import annotations

import re
from typing import Any

from .documents import Document, document, field, require
from .layout import check_key, check_name, check_sha256, parse_blob_key

MODES = ("ffe", "asym", "fedavg")  # fedavg: any PyTorch model, no fingerprint phase
AGGREGATIONS = ("sync", "async")
BUFFER_TRIGGERS = ("fresh", "any")
WEIGHTINGS = ("cases", "uniform")
ALIGNS = ("resolution", "name")
STALENESS = ("inverse_sqrt", "constant", "polynomial", "hinge")
ROLES = ("site", "aggregator")
RULES = ("fedavg", "median", "trimmed_mean")  # the aggregation rule of a round (fedfs.fl.robust for the robust two)
#: The smallest ``keep_globals`` that prunes: the newest global and the one it was folded onto.
MIN_KEEP_GLOBALS = 2
#: nnU-Net's standard configurations; a custom planner's own names need ``fedfs init --custom-configuration``.
STANDARD_CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")
#: Refused at ``fedfs init``: the cascade (docs/nnunet.md, Cascade). 3d_cascade_fullres trains on the
#: 3d_lowres model's predictions of every training case (nnU-Net's predict_next_stage over all five
#: folds' validation), which no site has and the bucket never carries; 3d_lowres exists only where a
#: planner finds the fullres patch too small, so some sites' plans lack it (AsymFedAvg then fails).
CASCADE_CONFIGURATIONS = {
    "3d_lowres": "it exists only where nnU-Net's planner finds the full-resolution patch too small for the "
                 "images, so some sites' plans lack it, and on its own it is only the first stage of the cascade",
    "3d_cascade_fullres": "it trains on the 3d_lowres model's predictions of every training case (nnU-Net's "
                          "predict_next_stage over all five folds), which a federation never produces",
}
#: nnU-Net's experiment planners and the plans identifier each writes (the default of its
#: ``plans_name``; tests/test_nnunet_presets.py checks this table against nnU-Net's classes).
PLANNERS = {
    "ExperimentPlanner": "nnUNetPlans",
    "nnUNetPlannerResEncM": "nnUNetResEncUNetMPlans",
    "nnUNetPlannerResEncL": "nnUNetResEncUNetLPlans",
    "nnUNetPlannerResEncXL": "nnUNetResEncUNetXLPlans",
    "ResEncUNetPlanner": "nnUNetResEncUNetPlans",
}
DEFAULT_PLANNER = "ExperimentPlanner"
#: nnU-Net's folds (``-f``): the five cross-validation folds, or ``all`` (every case trains).
FOLDS = ("0", "1", "2", "3", "4", "all")
_CLASS_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_PLANS_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_configuration(name: str, custom: bool = False) -> str:
    """``name`` if it is a standard nnU-Net configuration (or any safe name when ``custom``, for a
    planner that makes its own); else ConfigError with the nearest standard name."""
    import difflib

    from ..errors import ConfigError

    if name in CASCADE_CONFIGURATIONS:
        raise ConfigError(f"configuration {name!r} is not supported in a federation: {CASCADE_CONFIGURATIONS[name]}; "
                          "train 3d_fullres or 2d (docs/nnunet.md, Cascade)")
    if name in STANDARD_CONFIGURATIONS:
        return name
    if custom and isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        return name
    near = difflib.get_close_matches(str(name), STANDARD_CONFIGURATIONS, n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    raise ConfigError(f"configuration {name!r} is not a standard nnU-Net one ({', '.join(STANDARD_CONFIGURATIONS)}); "
                      f"{hint}for a name your custom planner produces, add --custom-configuration")


@document("party")
class Party(Document):
    """One member of the federation and its Ed25519 public key (base64, raw 32 bytes)."""

    name: str
    role: str
    public_key: str


@document("federation", version=1)
class FederationConfig(Document):
    """``federation.json``: who takes part, with which keys, and how the federation trains.

    Written once by ``fedfs init``; signed by the aggregator's key.
    """

    federation_id: str
    mode: str
    configuration: str
    aggregator: Party
    sites: list[Party]
    rounds: int = 5
    local_epochs: int = 1
    aggregation: str = "sync"
    buffer_size: int = 0  # FedBuff K; 0 means "number of sites"
    buffer_trigger: str = "fresh"  # async: K counts updates trained from the current global ("any": of any age)
    min_sites: int = 0  # sync deadline fallback; 0 means "all sites"
    deadline_s: float = 0.0  # 0 means no deadline
    eta: float = 1.0
    staleness: str = "inverse_sqrt"
    staleness_a: float = 0.5
    staleness_b: float = 4.0
    max_staleness: int = 8
    weighting: str = "cases"
    align: str = "resolution"
    seed: int = 12345
    update_norm_limit: float = 0.0  # reject ||update - base|| > limit * ||base||; 0 = off
    max_cases: int = 100_000  # bounded influence: a site claiming more training cases is refused; 0 = no bound
    keep_globals: int = 0  # retention: keep the payloads of the last K globals (protocol/retention.py); 0 = all
    rule: str = "fedavg"  # RULES: fedavg (the mode's weighted mean), or a robust median / trimmed mean (sync only)
    trim_fraction: float = 0.1  # trimmed_mean: the fraction of updates dropped at each end, per coordinate
    dp_epsilon: float = 0.0  # DP-FedAvg (fedfs.privacy.dp): the (epsilon, delta) budget of the whole federation; 0 = off
    dp_delta: float = 0.0
    dp_clip: float = 0.0  # C: each update (trained - base) is clipped to this L2 norm at its site
    dp_noise_multiplier: float = 0.0  # z, derived by `fedfs init` from the budget and the rounds
    secure_aggregation: bool = False  # SecAgg+ over the bucket (fedfs.privacy.secagg): the aggregator learns only sums
    planner: str = DEFAULT_PLANNER  # nnU-Net's -pl, the same at every site
    plans_identifier: str = ""  # nnU-Net's -p; "": what the planner writes (see plans_name)
    pretrained_weights: BlobRef | None = None  # safetensors every site loads before its initial weights (v0)
    fold: str = "0"  # nnU-Net's -f every site trains (one fold per federation; docs/nnunet.md, Folds)
    created: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        require(self.mode in MODES, where, f"mode must be one of {MODES}, got {self.mode!r}")
        require(self.aggregation in AGGREGATIONS, where, f"aggregation must be one of {AGGREGATIONS}")
        require(self.buffer_trigger in BUFFER_TRIGGERS, where,
                f"buffer_trigger must be one of {BUFFER_TRIGGERS}, got {self.buffer_trigger!r}")
        require(self.weighting in WEIGHTINGS, where, f"weighting must be one of {WEIGHTINGS}")
        require(self.align in ALIGNS, where, f"align must be one of {ALIGNS}")
        require(self.staleness in STALENESS, where, f"staleness must be one of {STALENESS}")
        require(self.rounds >= 1, where, "rounds must be at least 1")
        require(self.local_epochs >= 1, where, "local_epochs must be at least 1")
        require(self.buffer_size >= 0 and self.min_sites >= 0, where, "buffer_size and min_sites must be >= 0")
        require(self.deadline_s >= 0, where, "deadline_s must be >= 0")
        require(self.max_staleness >= 0, where, "max_staleness must be >= 0")
        require(0 < self.eta <= 10, where, "eta must be in (0, 10]")
        require(self.update_norm_limit >= 0, where, "update_norm_limit must be >= 0")
        require(self.max_cases >= 0, where, "max_cases must be >= 0 (0: no bound)")
        require(self.keep_globals == 0 or self.keep_globals >= MIN_KEEP_GLOBALS, where,
                f"keep_globals must be 0 (keep every global) or at least {MIN_KEEP_GLOBALS}, got {self.keep_globals}")
        require(isinstance(self.planner, str) and bool(_CLASS_NAME_RE.fullmatch(self.planner)), where,
                f"planner must be a Python class name, got {self.planner!r}")
        require(isinstance(self.plans_identifier, str) and (self.plans_identifier == "" or bool(
            _PLANS_NAME_RE.fullmatch(self.plans_identifier))), where,
                f"plans_identifier must be a plain file name stem, got {self.plans_identifier!r}")
        other = [p for p, ident in PLANNERS.items() if ident == self.plans_identifier and p != self.planner]
        require(not other or PLANNERS.get(self.planner) == self.plans_identifier, where,
                f"plans_identifier {self.plans_identifier!r} is what {other[0] if other else ''} writes, not "
                f"{self.planner}: a site would train another planner's plans (leave it empty to derive it)")
        self._validate_privacy(where)
        self._validate_secure_aggregation(where)
        require(self.fold in FOLDS, where, f"fold must be one of {FOLDS}, got {self.fold!r}")
        if self.pretrained_weights is not None:
            self.pretrained_weights.validate(where)
            require(self.pretrained_weights.key.endswith(".safetensors"), where,
                    "pretrained_weights must be a safetensors blob (nothing pickled crosses the bucket)")
        require(len(self.sites) >= 1, where, "a federation needs at least one site")
        check_name(self.aggregator.name, "aggregator name")
        require(self.aggregator.role == "aggregator", where, "aggregator entry must have role 'aggregator'")
        names = [s.name for s in self.sites]
        for s in self.sites:
            check_name(s.name)
            require(s.role == "site", where, f"site {s.name!r} must have role 'site'")
        require(len(set(names)) == len(names), where, "site names must be unique")
        require(self.aggregator.name not in names, where, "the aggregator's name must differ from every site's")

    @property
    def plans_name(self) -> str:
        """nnU-Net's plans identifier (``-p``) every site trains: ``plans_identifier``, or what the planner
        writes (:data:`PLANNERS`; "" for another planner, which the site asks nnU-Net about)."""
        return self.plans_identifier or PLANNERS.get(self.planner, "")

    def _validate_secure_aggregation(self, where: str) -> None:
        """Secure aggregation needs one synchronous sum per round of one model (docs/secure-aggregation.md)."""
        if not self.secure_aggregation:
            return
        require(self.mode in ("ffe", "fedavg"), where,
                f"secure aggregation cannot be used with mode {self.mode!r}: AsymFedAvg combines each layer over "
                "the sites whose networks have it, so every site's sum would differ; use ffe or fedavg")
        require(self.aggregation == "sync", where,
                "secure aggregation needs aggregation 'sync': its masks cancel only in the sum of one round's "
                "fixed set of sites, while FedBuff folds updates one by one with staleness weights")
        require(len(self.sites) >= 3, where,
                f"secure aggregation needs at least 3 sites, got {len(self.sites)}: with two, each learns the "
                "other's update from the sum")
        require(self.update_norm_limit == 0, where,
                "secure aggregation with update_norm_limit: the aggregator never sees a site's update, so it "
                "cannot measure its norm (set update_norm_limit to 0)")

    def _validate_privacy(self, where: str) -> None:
        """The robust rules and DP-FedAvg, and the settings each cannot be combined with (docs/privacy.md)."""
        require(self.rule in RULES, where, f"rule must be one of {RULES}, got {self.rule!r}")
        require(0 <= self.trim_fraction < 0.5, where, f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        if self.rule != "fedavg":
            require(self.aggregation == "sync", where,
                    f"rule {self.rule} orders one round's fresh updates, so it needs aggregation 'sync' "
                    "(asynchronous FedBuff weighs stale updates, which an order statistic cannot)")
            require(not getattr(self, "secure_aggregation", False), where,
                    f"rule {self.rule} cannot be combined with secure aggregation: the aggregator then learns only "
                    "the sum of the updates, and a median or trimmed mean needs each update's own values")
        if not (self.dp_epsilon or self.dp_delta or self.dp_clip or self.dp_noise_multiplier):
            return
        require(self.dp_epsilon > 0 and 0 < self.dp_delta < 1 and self.dp_clip > 0, where,
                f"differential privacy needs dp_epsilon > 0, 0 < dp_delta < 1 and dp_clip > 0, got "
                f"{self.dp_epsilon}, {self.dp_delta}, {self.dp_clip}")
        require(self.dp_noise_multiplier > 0, where, "dp_noise_multiplier must be > 0 (fedfs init derives it)")
        require(self.rule == "fedavg", where,
                f"differential privacy with rule {self.rule}: the noise is calibrated for the mean of clipped "
                "updates; a median or trimmed mean of noised updates has another sensitivity")
        require(self.aggregation == "sync", where,
                "differential privacy needs aggregation 'sync': the accountant counts one round of every site "
                "(sampling rate 1); asynchronous rounds fold varying subsets with staleness weights")
        require(self.mode != "asym", where,
                "differential privacy in asym mode: AsymFedAvg averages each layer over the sites that have it, "
                "and a layer one site holds alone is that site's update, with a fraction of the noise")
        require(self.weighting == "uniform", where,
                "differential privacy needs weighting 'uniform' (--weighting uniform): the noise is calibrated for "
                "the plain mean, which one site moves by at most C/N; case weights let a large site move it more")

    def case_claim_problem(self, site: str, num_cases: int) -> str | None:
        """Why ``site``'s claim of ``num_cases`` training cases is refused (bounded influence), or None."""
        if self.max_cases and num_cases > self.max_cases:
            return (f"site {site} claims {num_cases} training cases, over the federation's bound of {self.max_cases} "
                    f"per site (federation.json max_cases; the coordinator sets it with `fedfs init --max-cases`)")
        return None

    @property
    def site_names(self) -> list[str]:
        return sorted(s.name for s in self.sites)

    def party(self, name: str) -> Party | None:
        if name == self.aggregator.name:
            return self.aggregator
        return next((s for s in self.sites if s.name == name), None)

    @property
    def k(self) -> int:
        """Updates per aggregation: FedBuff's K, or every site in sync mode."""
        if self.aggregation == "sync" or self.buffer_size == 0:
            return len(self.sites)
        return min(self.buffer_size, len(self.sites))


@document("blob")
class BlobRef(Document):
    """A content-addressed payload: its key, sha256 and size in bytes."""

    key: str
    sha256: str
    size: int

    def validate(self, where: str) -> None:
        check_key(self.key)
        check_sha256(self.sha256)
        require(self.size >= 0, where, "blob size must be >= 0")
        parsed = parse_blob_key(self.key)
        require(parsed is not None and parsed[1] == self.sha256, where,
                f"blob key {self.key!r} must be <writer>/blobs/<its sha256>.<ext>")


@document("site-census")
class SiteCensus(Document):
    """FFE phase 1: how many training cases a site has (and its channel count)."""

    site: str
    num_cases: int
    num_channels: int
    nnunet_version: str = ""
    revision: int = 0  # N >= 1 supersedes the site's earlier censuses (before v0; docs/protocol.md)
    labels: dict[str, Any] = field(default_factory=dict)  # dataset.json "labels" ({} when not told)
    channel_names: dict[str, Any] = field(default_factory=dict)  # dataset.json "channel_names"
    masked: bool = False  # secure FFE: the count goes into the masked census sum, so num_cases here is 0

    def validate(self, where: str) -> None:
        check_name(self.site)
        if self.masked:
            require(self.num_cases == 0, where, f"a masked census carries num_cases 0, got {self.num_cases}")
        else:
            require(self.num_cases >= 1, where, f"num_cases must be >= 1, got {self.num_cases}")
        require(self.num_channels >= 1, where, f"num_channels must be >= 1, got {self.num_channels}")


@document("census")
class Census(Document):
    """Aggregator's answer to phase 1: the federation-wide case count phase 2 needs."""

    total_cases: int
    num_channels: int
    sites: dict[str, int]
    extra: dict[str, Any] = field(default_factory=dict)
    revision: int = 0  # N >= 1 supersedes the merged censuses before it
    sources: dict[str, int] = field(default_factory=dict)  # site -> the census revision merged
    labels: dict[str, Any] = field(default_factory=dict)  # the labels every site shares
    channel_names: dict[str, Any] = field(default_factory=dict)
    masked: bool = False  # secure FFE: total_cases is the unmasked sum; no site's count is known (sites is {})

    def validate(self, where: str) -> None:
        if self.masked:
            require(not self.sites and self.total_cases >= 1, where,
                    "a securely summed census names no site's count (sites must be empty) and a total >= 1")
        else:
            require(self.total_cases == sum(self.sites.values()), where,
                    "total_cases must equal the sum of site counts")


@document("fingerprint-summary")
class FingerprintSummary(Document):
    """FFE phase 2 (or an AsymFedAvg local fingerprint): a site's mergeable summary."""

    site: str
    mode: str
    total_cases: int
    summary: dict[str, Any]
    revision: int = 0  # N >= 1 supersedes the site's earlier summaries (before v0)
    census_revision: int = 0  # the merged census this summary answers


@document("global-fingerprint")
class GlobalFingerprint(Document):
    """The merged nnU-Net ``dataset_fingerprint.json`` every FFE site plans from."""

    fingerprint: dict[str, Any]
    sites: list[str]
    total_cases: int
    revision: int = 0  # N >= 1 supersedes the merged fingerprints before it
    sources: dict[str, int] = field(default_factory=dict)  # site -> the summary revision merged


@document("plans")
class PlansDocument(Document):
    """The digest and a summary of the plans a site trains with."""

    site: str
    plans_identifier: str
    configuration: str
    digest: str
    summary: dict[str, Any]
    nnunet_version: str = ""
    init_blob: BlobRef | None = None  # the site's initial weights: its declared architecture
    fingerprint_revision: int = 0  # FFE: the merged fingerprint these plans were made from

    def validate(self, where: str) -> None:
        check_name(self.site)
        check_sha256(self.digest)


@document("update")
class UpdateManifest(Document):
    """A site's model update for one round: trained from global ``base_version``."""

    site: str
    round: int
    base_version: int
    blob: BlobRef
    num_cases: int
    plans_digest: str = ""
    metrics: dict[str, float] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        check_name(self.site)
        require(self.round >= 0, where, "round must be >= 0")
        require(self.base_version >= 0, where, "base_version must be >= 0")
        require(self.num_cases >= 1, where, "num_cases must be >= 1")


@document("contribution")
class Contribution(Document):
    """One update folded into a global version, with the weight it got."""

    site: str
    round: int
    key: str
    sha256: str
    base_version: int
    staleness: int
    weight: float


@document("global")
class GlobalManifest(Document):
    """Global model ``version``. ``blob`` for FFE; ``site_blobs`` per site for AsymFedAvg."""

    version: int
    blob: BlobRef | None = None
    site_blobs: dict[str, BlobRef] = field(default_factory=dict)
    contributions: list[Contribution] = field(default_factory=list)
    next_rounds: dict[str, int] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    final: bool = False

    def validate(self, where: str) -> None:
        require(self.version >= 0, where, "version must be >= 0")
        require(self.blob is not None or bool(self.site_blobs), where, "a global names at least one blob")
        for site in self.site_blobs:
            check_name(site)

    def is_final(self, rounds: int) -> bool:
        """The federation ends with this global: marked final, or the last of ``rounds``."""
        return self.final or self.version >= rounds

    def blob_for(self, site: str) -> BlobRef | None:
        """The weights ``site`` trains from: its own in AsymFedAvg, the one global in FFE."""
        return self.site_blobs.get(site, self.blob)


@document("latest")
class LatestHint(Document):
    """A mutable hint: the newest global version the aggregator published."""

    version: int

    def validate(self, where: str) -> None:
        require(self.version >= 0, where, f"version must be >= 0, got {self.version}")


@document("heartbeat")
class Heartbeat(Document):
    """A mutable hint: a party's phase and last sign of life."""

    party: str
    phase: str
    round: int = -1
    base_version: int = -1
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


@document("rejection")
class Rejection(Document):
    """One refused file (or, under ``aggregator/problems/``, a problem a person must fix)."""

    key: str
    reason: str
    at: str
    sites: list[str] = field(default_factory=list)  # the sites whose files cause it (their steps say "blocked")


@document("status")
class StatusDocument(Document):
    """A party's quarantine record: files it rejected and why."""

    party: str
    rejected: list[Rejection] = field(default_factory=list)
