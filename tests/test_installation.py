"""A site notices another machine publishing under its name (one key on two machines).

Each site keeps a random installation token in its workdir and signs with it; a document at
one of its own keys, signed by its own name but by another installation, stops it with a
message that says what happened. A Conflict at a write-once key says what probably happened.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from fedfs import layout
from fedfs.errors import Blocked, Conflict
from fedfs.federation import Federation, config_from_key_dir
from fedfs.protocol.schema import Heartbeat, SiteCensus
from fedfs.roles.installation import INSTALLATION_FILE
from fedfs.roles.site import Site
from fedfs.testing.toy import ToyWork
from fedfs.trust.signing import installation_of


@pytest.fixture
def fed(tmp_path, keys):
    config, agg = config_from_key_dir(keys, ["A", "B"], rounds=1)
    fed, _ = Federation.create(str(tmp_path / "bucket"), config, agg)
    return fed


def site(fed, keys, key_of, workdir, data_of=None):
    """A toy site acting with ``key_of``'s key, computing on ``data_of``'s data, in ``workdir``."""
    return Site(fed.as_party(keys / f"{key_of}.key"), ToyWork(data_of or key_of, cases=4), workdir)


def heartbeat_installation(fed, name):
    return installation_of(fed.bucket.read(layout.site_heartbeat(name), Heartbeat).writer_token)


def test_a_second_daemon_with_the_same_key_stops_and_the_first_goes_on(fed, keys, tmp_path):
    # Prepare: A runs on one machine and has published its census
    first = site(fed, keys, "A", tmp_path / "machine-1")
    assert first.step().action == "census"
    # Execute: the same key started on a second machine
    second = site(fed, keys, "A", tmp_path / "machine-2")
    with pytest.raises(Blocked) as err:
        second.step()
    # Assert: the message says what happened and names both installations and the fix
    msg = str(err.value)
    assert msg.startswith("another machine is publishing as A:")
    assert first.installation.token in msg and second.installation.token in msg
    assert "two daemons share one key, or a key was copied" in msg.lower()
    assert str(tmp_path / "machine-2" / INSTALLATION_FILE) in msg
    # the second wrote nothing: the first machine's heartbeat is untouched and it goes on
    assert heartbeat_installation(fed, "A") == first.installation.token
    assert first.step().action == "wait"


def test_a_machine_with_another_sites_key_is_noticed_when_the_real_site_starts(fed, keys, tmp_path):
    # Prepare: HospitalA's machine was started with B's key: it published B's census (A's data)
    impostor = site(fed, keys, "B", tmp_path / "hospital-A-machine", data_of="A")
    impostor.step()
    assert fed.bucket.read(layout.site_census("B"), SiteCensus).signer == "B"
    # Execute: the real B starts
    real_b = site(fed, keys, "B", tmp_path / "hospital-B-machine")
    with pytest.raises(Blocked, match="another machine is publishing as B") as err:
        real_b.step()
    # Assert: it names the document it found (before: B only said "waiting")
    assert impostor.installation.token in str(err.value) and "heartbeat" in str(err.value)


def test_two_fresh_daemons_started_at_once_notice_each_other_by_the_heartbeat(fed, keys, tmp_path):
    # Prepare: both check the bucket before either has written anything
    one, two = site(fed, keys, "A", tmp_path / "m1"), site(fed, keys, "A", tmp_path / "m2")
    two.installation.check_once(fed.bucket)
    two.installation.check_every_s = 0.0
    # Execute: one publishes the census; two finds it (the same content) and carries on to its heartbeat
    assert one.step().action == "census"
    with pytest.raises(Blocked, match="its heartbeat .* was written by installation " + one.installation.token):
        two.step()


def test_restart_on_the_same_machine_and_an_adopted_installation_are_fine(fed, keys, tmp_path):
    first = site(fed, keys, "A", tmp_path / "m1")
    first.step()
    again = site(fed, keys, "A", tmp_path / "m1")  # a restart keeps the workdir's token
    assert again.installation.token == first.installation.token
    assert again.step().action == "wait"
    # a replacement machine that adopts the old token, as the message says, goes on too
    (tmp_path / "m2").mkdir()
    (tmp_path / "m2" / INSTALLATION_FILE).write_text(first.installation.token + "\n")
    assert site(fed, keys, "A", tmp_path / "m2").step().action == "wait"


def test_documents_without_an_installation_are_not_held_against_anyone(fed, keys, tmp_path):
    party = fed.as_party(keys / "A.key")  # signs as before installations existed
    party.bucket.publish(layout.site_census("A"), SiteCensus(site="A", num_cases=4, num_channels=1), party.identity)
    assert site(fed, keys, "A", tmp_path / "m1").step().action == "wait"


def test_a_conflict_says_what_probably_happened(fed, keys):
    party = fed.as_party(keys / "A.key")
    x, y = (dataclasses.replace(party.identity, installation=t) for t in ("aaaa", "bbbb"))
    fed.bucket.publish(layout.site_census("A"), SiteCensus(site="A", num_cases=4, num_channels=1), x)
    other = SiteCensus(site="A", num_cases=5, num_channels=1)
    with pytest.raises(Conflict, match="installation aaaa wrote it and this is bbbb, so two machines publish as 'A'"):
        fed.bucket.publish(layout.site_census("A"), other, y)
    with pytest.raises(Conflict, match="this machine wrote it before .* local state was reset"):
        fed.bucket.publish(layout.site_census("A"), other, x)
    with pytest.raises(Conflict, match="either another machine publishes as 'A'"):
        fed.bucket.publish(layout.site_census("A"), other, party.identity)


def test_a_forged_document_at_ones_own_key_is_named_as_such(fed, keys):
    # someone with write access but not A's key copied A's census body, signed by B, to A's key
    b = fed.as_party(keys / "B.key")
    census = SiteCensus(site="A", num_cases=4, num_channels=1)
    forged = {**b.identity.sign(census.to_dict()), "signer": "A"}
    fed.store.publish(layout.site_census("A"), json.dumps(forged).encode())
    a = fed.as_party(keys / "A.key")
    with pytest.raises(Conflict, match="already exists and is not a valid document"):  # was: success
        a.bucket.publish(layout.site_census("A"), census, a.identity)


def test_the_toy_party_process_stops_with_the_message(fed, keys, tmp_path):
    # Prepare: A runs (in this process) and has published its census
    site(fed, keys, "A", tmp_path / "m1").step()
    # Execute: a second daemon with A's key, as its own process
    proc = subprocess.run([sys.executable, "-m", "fedfs.testing.toy_party", "site", fed.store.url, "--key",
                           str(keys / "A.key"), "--workdir", str(tmp_path / "m2"), "--watch", "poll", "-q"],
                          capture_output=True, text=True, timeout=120)
    # Assert: it stopped at once with the blocked exit code and the reason
    assert proc.returncode == Blocked.exit_code, proc.stderr
    assert "fedfs: error: another machine is publishing as A" in proc.stderr
