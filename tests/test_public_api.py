"""``fedfs``'s public names: pinned, lazy, and each one resolves to what it says."""

from __future__ import annotations

import subprocess
import sys

import fedfs

PUBLIC = [
    "Action", "Aggregator", "Bucket", "ConfigError", "Conflict", "FedAsync", "FedAvg", "FedBuff", "Federation",
    "FedfsError", "Identity", "IntegrityError", "InvalidName", "LocalWork", "Median", "NnunetOptions", "NnunetWork",
    "NotFound", "SchemaError", "SignatureError", "SimulationSpec", "Site", "SiteClient", "Staleness",
    "StateUnknown", "StepResult", "Store", "StoreError", "StoreUnavailable", "TooLarge", "ToyWork", "TrimmedMean",
    "Update",
    "ValidationError", "__version__", "aggregate", "aggregate_asym", "build_report", "collect_status",
    "config_from_key_dir", "export_site_model", "extract_site", "generate_keypair", "layout", "load_identity",
    "make_federation", "make_trigger", "nnunet_environment", "open_store", "run_doctor", "run_loop", "simulate",
]


def test_all_is_pinned():
    assert fedfs.__all__ == sorted(PUBLIC)


def test_every_public_name_resolves():
    for name in fedfs.__all__:
        obj = getattr(fedfs, name)
        if name not in ("__version__", "layout"):
            assert getattr(obj, "__name__", name) == name, name
    assert fedfs.layout.global_version(3) == "aggregator/globals/v000003.json"


def test_unknown_names_raise_attribute_error():
    try:
        fedfs.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("fedfs.no_such_name resolved")


def test_import_is_cheap():
    code = ("import sys, fedfs; fedfs.Federation; fedfs.layout; fedfs.collect_status; "
            "print(sorted(m for m in ('torch', 'nnunetv2', 's3fs', 'click') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
