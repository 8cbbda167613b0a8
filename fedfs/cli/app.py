"""The ``fedfs`` command line: a thin shell over the Python API.

Heavy modules (torch, nnunetv2, s3fs) are imported inside commands, so
``fedfs --help`` stays fast. Errors are one line on stderr with the exit code
from :data:`fedfs.errors.EXIT_CODES`; ``--debug`` or ``FEDFS_DEBUG=1`` adds the
traceback.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

import click

from ..errors import FedfsError, exit_code_for
from .options import (
    CONTEXT,
    aggregation_choice,
    align_choice,
    buffer_size_option,
    buffer_trigger_option,
    init_nnunet_options,
    mode_choice,
    privacy_options,
    role_choice,
    staleness_ab_options,
    staleness_choice,
    storage_option,
    storage_options_of,
    url_argument,
    weighting_choice,
)


@click.group(context_settings=CONTEXT)
@click.option("--debug", is_flag=True, envvar="FEDFS_DEBUG", help="Show tracebacks on errors (also FEDFS_DEBUG=1).")
@click.version_option(package_name="fedfs")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Federated nnU-Net over a shared bucket: a folder, an SMB share or S3.

    Sites and the aggregator never connect to each other; they read and
    write signed files in one bucket.

    \b
    Example (one machine, a local folder as the bucket):
      fedfs keygen agg --role aggregator -o keys
      fedfs keygen A -o keys && fedfs keygen B -o keys
      fedfs init /tmp/fed --sites A,B --keys keys
      fedfs doctor /tmp/fed
    """
    ctx.obj = {"debug": debug}


@main.command(context_settings=CONTEXT)
@click.argument("name")
@click.option("--role", type=role_choice, default="site", show_default=True)
@click.option("-o", "--out", "out_dir", default="keys", show_default=True, type=click.Path(file_okay=False),
              help="Folder for NAME.key (private, mode 0600) and NAME.pub.")
def keygen(name: str, role: str, out_dir: str) -> None:
    """Create an Ed25519 key pair for a site or the aggregator.

    Send NAME.pub to the coordinator; NAME.key never leaves this machine.

    \b
    Example:
      fedfs keygen HospitalA -o /etc/fedfs/keys
    """
    from ..trust.signing import generate_keypair

    key, pub = generate_keypair(name, role, out_dir)
    click.echo(f"wrote {key} (private, keep it here) and {pub} (public, send it to the coordinator)")


@main.command(context_settings=CONTEXT)
@url_argument
@click.option("--sites", required=True, help="Comma-separated site names, e.g. A,B,C.")
@click.option("--keys", "key_dir", required=True, type=click.Path(file_okay=False),
              help="Folder with every SITE.pub and the aggregator's .key.")
@click.option("--mode", type=mode_choice, default="ffe", show_default=True,
              help="ffe: one nnU-Net plan from a merged fingerprint; asym: local plans, shared layers averaged; "
                   "fedavg: any PyTorch model, no fingerprint phase.")
@click.option("-c", "--configuration", default="2d", show_default=True,
              help="nnU-Net configuration to train: 2d or 3d_fullres (the cascade, 3d_lowres and "
                   "3d_cascade_fullres, is refused: docs/nnunet.md).")
@click.option("--custom-configuration", is_flag=True,
              help="Accept a configuration name outside nnU-Net's standard ones (one your custom planner makes).")
@init_nnunet_options
@click.option("--rounds", type=int, default=5, show_default=True)
@click.option("--local-epochs", type=int, default=1, show_default=True, help="nnU-Net epochs per round.")
@click.option("--aggregation", type=aggregation_choice, default="sync", show_default=True)
@buffer_size_option
@buffer_trigger_option
@click.option("--min-sites", type=int, default=0, help="Sync: after --deadline, aggregate with at least this many.")
@click.option("--deadline", "deadline_s", type=float, default=0.0,
              help="Sync: seconds to wait for slow sites (0 = forever). Async, fresh trigger: after this, "
                   "K updates of any age suffice.")
@click.option("--max-staleness", type=int, default=8, show_default=True,
              help="Async: updates more than this many versions behind are dropped.")
@click.option("--staleness", type=staleness_choice,
              default="inverse_sqrt", show_default=True,
              help="Async: weight of an update t versions behind (inverse_sqrt: 1/sqrt(1+t); "
                   "polynomial: (1+t)^-a; hinge: 1 up to b, then 1/(a(t-b)+1); constant: 1).")
@staleness_ab_options
@click.option("--weighting", type=weighting_choice, default="cases", show_default=True)
@click.option("--update-norm-limit", type=float, default=0.0, show_default=True,
              help="Reject updates with ||update - base|| > LIMIT x ||base|| (0 = off; see docs/security.md).")
@click.option("--max-cases", type=int, default=100_000, show_default=True,
              help="Bounded influence: a site claiming more training cases than this is refused (0 = no bound; "
                   "`fedfs status` shows each site's weight share before training).")
@click.option("--keep-globals", type=int, default=3, show_default=True,
              help="Retention: keep the weights of the last K globals (and the final one) and remove older "
                   "globals' and folded updates' payloads; manifests stay (0 = keep everything; see "
                   "docs/protocol.md, Retention).")
@click.option("--align", type=align_choice, default="resolution", show_default=True,
              help="AsymFedAvg layer matching: by resolution level, or by name (the reference behaviour).")
@privacy_options
@storage_option
def init(url: str, sites: str, key_dir: str, storage_options: tuple[str, ...], **settings: Any) -> None:
    """Write federation.json (once) to the bucket at URL.

    A second init with identical settings is a no-op; with different
    settings it fails and names the differences.

    \b
    Example:
      fedfs init s3://fed-bucket/liver --sites A,B,C --keys keys --mode ffe --rounds 20
    """
    from ..federation import config_from_key_dir, create_folds, parse_folds

    names = [s.strip() for s in sites.split(",") if s.strip()]
    pretrained, folds = settings.pop("pretrained_weights", None), parse_folds(settings.pop("folds"))
    config, identity = config_from_key_dir(key_dir, names, **settings)
    for fold, fed, created in create_folds(url, config, identity, folds, pretrained_weights=pretrained,
                                           storage_options=storage_options_of(storage_options)):
        verb = "created" if created else "already initialised (identical settings)"
        click.echo(f"{fed.store.url}: federation {verb}; sha256 {fed.digest}")
        click.echo(f"  mode {fed.config.mode}, {fed.config.aggregation}, sites {', '.join(fed.config.site_names)}, "
                   f"aggregator {fed.config.aggregator.name}, fold {fold}, plans {fed.config.plans_name}")
    if fed.config.rule != "fedavg" or fed.config.dp_noise_multiplier:
        from ..privacy.dp import describe

        click.echo(f"  {describe(fed.config)}")


@main.command(context_settings=CONTEXT)
@url_argument
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--prefix", default=None, help="Probe prefix (default doctor/HOST-RANDOM); a site may use sites/NAME/doctor.")
@click.option("--workdir", "workdirs", multiple=True, type=click.Path(file_okay=False),
              help="A party's working folder whose free space to check too (repeatable).")
@storage_option
def doctor(url: str, as_json: bool, prefix: str | None, workdirs: tuple[str, ...],
           storage_options: tuple[str, ...]) -> None:
    """Check that a bucket works from this machine; exit 0 when usable.

    Writes, lists, reads back, checks that exclusive publish really is
    exclusive (also under concurrent writers), round-trips a sha256 and
    measures latency, then verifies federation.json if there is one.
    Warns when a folder bucket, the temp folder or a --workdir has under
    5 GiB or 10 % free; a full disk is not usable.

    \b
    Example:
      AWS_ENDPOINT_URL=https://minio.local:9000 fedfs doctor s3://fed-bucket/liver
    """
    from ..ops.doctor import run_doctor
    from ..store import open_store

    store = open_store(url, storage_options_of(storage_options))
    report = run_doctor(store, probe_prefix=prefix, folders=workdirs)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.render())
    sys.exit(0 if report.ok else 9)


@main.command(context_settings=CONTEXT)
@click.option("--dir", "workdir", default=None, type=click.Path(file_okay=False),
              help="Working folder (default: a new temporary folder).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object {bucket, mode, sites, rounds, dice_per_site, exported} instead of a summary.")
@click.option("--rounds", type=int, default=None, help="Federated rounds (default 3).")
@click.option("--local-epochs", type=int, default=None, help="nnU-Net epochs per round (default 4).")
@click.option("--mode", type=mode_choice, default="ffe", show_default=True)
@click.option("--aggregation", type=aggregation_choice, default="sync", show_default=True)
def demo(workdir: str | None, as_json: bool, rounds: int | None, local_epochs: int | None, mode: str,
         aggregation: str) -> None:
    """Run a small federation end to end on a local folder and report held-out Dice.

    Makes synthetic 2D data for three heterogeneous hospitals, simulates the
    federation (separate processes sharing one folder), exports each site's
    model and segments its held-out cases with nnUNetv2_predict.

    \b
    Example:
      fedfs demo --dir /tmp/fedfs-demo
    """
    from ..ops.demo import DEMO_LOCAL_EPOCHS, DEMO_ROUNDS, run_demo

    result = run_demo(workdir, echo=None if as_json else click.echo, rounds=rounds or DEMO_ROUNDS,
                      local_epochs=local_epochs or DEMO_LOCAL_EPOCHS, mode=mode, aggregation=aggregation)
    if as_json:
        click.echo(json.dumps(result, indent=2))


def _register() -> None:
    from .roles import aggregator, site
    from .tools import bundle_group, export, report_command, simulate, status_command, synth

    for cmd in (site, aggregator, simulate, export, status_command, report_command, bundle_group, synth):
        main.add_command(cmd)


_register()


def run() -> None:
    """Console-script entry point: one-line errors with documented exit codes."""
    debug = "--debug" in sys.argv or os.environ.get("FEDFS_DEBUG", "") not in ("", "0")
    try:
        main.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except FedfsError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"fedfs: error: {exc}", err=True)
        sys.exit(exit_code_for(exc))
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - last-resort one-line error
        if debug:
            traceback.print_exc()
        click.echo(f"fedfs: unexpected error: {type(exc).__name__}: {exc} (rerun with --debug)", err=True)
        sys.exit(1)
