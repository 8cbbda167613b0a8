"""The CLI as a user runs it: real subprocesses of the installed ``fedfs`` console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedfs import layout
from fedfs.errors import Blocked
from fedfs.federation import Federation, config_from_key_dir
from fedfs.fl.plans import plans_digest
from fedfs.protocol.schema import PlansDocument, SiteCensus

FEDFS = str(Path(sys.executable).with_name("fedfs"))


def run(*args, env=None, check=True):
    proc = subprocess.run([FEDFS, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"fedfs {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_help_is_light():
    code = "import sys; from fedfs.cli import main; main(['--help'], standalone_mode=False); " \
           "print(sorted(m for m in ('torch', 'nnunetv2', 's3fs', 'smbprotocol') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
    for cmd in ("keygen", "init", "doctor", "demo"):
        assert cmd in out


def test_keygen_init_doctor_on_a_folder(tmp_path):
    keys = tmp_path / "keys"
    run("keygen", "agg", "--role", "aggregator", "-o", str(keys))
    for s in ("A", "B"):
        run("keygen", s, "-o", str(keys))
    assert oct((keys / "A.key").stat().st_mode & 0o777) == "0o600"
    again = run("keygen", "A", "-o", str(keys), check=False)
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    bucket = str(tmp_path / "bucket")
    out = run("init", bucket, "--sites", "A,B", "--keys", str(keys), "--mode", "asym").stdout
    assert "federation created" in out
    assert "already initialised" in run("init", bucket, "--sites", "A,B", "--keys", str(keys), "--mode", "asym").stdout
    conflict = run("init", bucket, "--sites", "A,B", "--keys", str(keys), "--mode", "ffe", check=False)
    assert conflict.returncode == 5 and "differs in mode" in conflict.stderr
    assert len(conflict.stderr.strip().splitlines()) == 1  # one clear line, no traceback
    report = json.loads(run("doctor", bucket, "--json").stdout)
    assert report["ok"] and report["federation"]["mode"] == "asym"
    assert report["publish_mechanism"] == "link"


def test_doctor_on_s3_via_aws_endpoint_url(s3_url, moto_endpoint):
    proc = run("doctor", s3_url, env={"AWS_ENDPOINT_URL": moto_endpoint})
    assert "[ok] exclusive publish" in proc.stdout and "verdict: usable" in proc.stdout
    assert "If-None-Match" in proc.stdout


def test_doctor_fails_clearly_on_unreachable_s3(tmp_path):
    proc = run("doctor", "s3://no-such-bucket-here/x", env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, check=False)
    assert proc.returncode != 0 and "NOT usable" in proc.stdout


def test_errors_are_one_line_unless_debug(tmp_path):
    proc = run("init", str(tmp_path / "b"), "--sites", "A", "--keys", str(tmp_path / "none"), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("fedfs: error:") and "Traceback" not in proc.stderr
    proc = run("--debug", "init", str(tmp_path / "b"), "--sites", "A", "--keys", str(tmp_path / "none"), check=False)
    assert "Traceback" in proc.stderr


def test_secrets_are_not_flags(tmp_path):
    proc = run("doctor", str(tmp_path), "-so", "secret=abc", check=False)
    assert proc.returncode == 2 and "environment" in proc.stderr


def test_doctor_on_smb(samba, smb_url):
    proc = run("doctor", smb_url, env={"FEDFS_SMB_PASSWORD": samba.password})
    assert "[ok] exclusive publish" in proc.stdout and "[ok] concurrent exclusive publish" in proc.stdout
    assert "verdict: usable" in proc.stdout


def test_options_from_config_file_and_environment(tmp_path):
    keys, bucket = tmp_path / "keys", str(tmp_path / "bucket")
    run("keygen", "agg", "--role", "aggregator", "-o", str(keys))
    run("keygen", "A", "-o", str(keys))
    digest = run("init", bucket, "--sites", "A", "--keys", str(keys)).stdout.split("sha256 ")[1].split()[0]
    cfg = tmp_path / "aggregator.toml"
    cfg.write_text(f'url = "{bucket}"\nkey = "{keys / "agg.key"}"\nworkdir = "{tmp_path / "w"}"\n'
                   f'federation-digest = "{digest}"\n')
    assert "waiting for site census" in run("aggregator", "step", "--config", str(cfg)).stdout
    env = {"FEDFS_URL": bucket, "FEDFS_KEY": str(keys / "agg.key"), "FEDFS_WORKDIR": str(tmp_path / "w")}
    assert "waiting for site census" in run("aggregator", "step", env=env).stdout
    bad = run("aggregator", "step", env={**env, "FEDFS_FEDERATION_DIGEST": "0" * 64}, check=False)
    assert bad.returncode == 4 and "pinned" in bad.stderr
    cfg.write_text(cfg.read_text() + 'password = "x"\n')
    leak = run("aggregator", "step", "--config", str(cfg), check=False)
    assert leak.returncode == 2 and "secrets do not belong" in leak.stderr


def test_a_blocked_aggregator_step_exits_10_with_the_reason(tmp_path, keys):
    # Prepare: a fedavg federation whose two sites published different plans
    config, agg = config_from_key_dir(keys, ["A", "B"], mode="fedavg")
    url = str(tmp_path / "bucket")
    fed, _ = Federation.create(url, config, agg)
    for site, depth in (("A", 2), ("B", 3)):
        party = fed.as_party(keys / f"{site}.key")
        plans = {"plans_name": "ToyPlans", "depth": depth}
        party.bucket.publish(layout.site_plans(site), PlansDocument(
            site=site, plans_identifier="ToyPlans", configuration="2d", digest=plans_digest(plans),
            summary={"plans": plans}), party.identity)
    # Execute
    proc = run("aggregator", "step", url, "--key", str(keys / "agg.key"), "--workdir", str(tmp_path / "w"), "-q",
               check=False)
    # Assert: the step returned, with the documented code and the reason on stderr, in one line
    assert proc.returncode == Blocked.exit_code == 10
    assert proc.stdout.startswith("blocked: FEDAVG sites hold different plans")
    error = proc.stderr.strip().splitlines()[-1]  # after the warnings the role logs
    assert error.startswith("fedfs: error: FEDAVG sites hold different plans") and "B differs from A in depth" in error


def test_a_blocked_site_step_exits_10_with_the_reason(tmp_path, keys):
    """A site step that can go no further (here: the aggregator refused its census, which claims more
    cases than the federation allows) returns at once with code 10 instead of stepping again and again
    under cron's lock."""
    from fedfs.roles.aggregator import Aggregator

    # Prepare: A's census claims 10**12 cases; the aggregator has refused it, naming A
    config, agg = config_from_key_dir(keys, ["A", "B"], mode="ffe", max_cases=1000)
    url = str(tmp_path / "bucket")
    fed, _ = Federation.create(url, config, agg)
    for site, n in (("A", 10**12), ("B", 4)):
        party = fed.as_party(keys / f"{site}.key")
        party.bucket.publish(layout.site_census(site), SiteCensus(site=site, num_cases=n, num_channels=1),
                             party.identity)
    assert Aggregator(fed.as_party(keys / "agg.key"), tmp_path / "agg").step().action == "blocked"
    # Execute: no nnU-Net runs (the dataset is never read before the census)
    proc = run("site", "step", url, "--key", str(keys / "A.key"), "--workdir", str(tmp_path / "w"), "-d", "999",
               "-q", check=False)
    # Assert
    assert proc.returncode == 10, proc.stderr
    assert proc.stdout.count("blocked: ") == 1 and "claims 1000000000000 training cases" in proc.stdout
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("fedfs: error: ") and "max_cases" in error


@pytest.mark.nnunet
def test_a_configuration_typo_ends_the_site_step_with_10(tmp_path, keys):
    """The trial's bug with real nnU-Net: the federation trains "2d_typo", which nnU-Net's plans lack.
    `fedfs site step` fingerprints and plans once, then returns blocked (it re-planned forever before)."""
    from fedfs.ops.simulate import nnunet_environment
    from fedfs.testing.synthetic import make_site

    # Prepare: one synthetic 2D site in a fedavg federation (sites plan at once)
    env = nnunet_environment(tmp_path, {"nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed":
                                        str(tmp_path / "pre"), "nnUNet_results": str(tmp_path / "res")})
    site = make_site(env["nnUNet_raw"], 611, "A", n_train=4, n_test=1, test_root=tmp_path / "heldout")
    config, agg = config_from_key_dir(keys, ["A", "B"], mode="fedavg", configuration="2d_typo",
                                      custom_configuration=True)
    url = str(tmp_path / "bucket")
    Federation.create(url, config, agg)
    # Execute
    proc = run("site", "step", url, "--key", str(keys / "A.key"), "--workdir", str(tmp_path / "w"),
               "-d", str(site.dataset_id), "-np", "1", "-npfp", "1", "-q", env=env, check=False)
    # Assert
    assert proc.returncode == 10, proc.stderr[-2000:]
    assert proc.stdout.count("blocked: ") == 1 and proc.stdout.strip().splitlines()[-1].startswith("blocked: ")
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("fedfs: error: ") and "no configuration '2d_typo'" in error
