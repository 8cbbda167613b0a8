"""``fedfs site ...`` and ``fedfs aggregator ...``: the role commands (registered by :mod:`fedfs.cli`).

Options mirror nnU-Net's where they mean the same thing; every option may come
from the environment (``FEDFS_<OPTION>``, e.g. ``FEDFS_DATASET``) or from a
TOML file given with ``--config`` (keys are option names, e.g. ``dataset = "501"``).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from .errors import ConfigError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """``--config FILE``: TOML keys become option defaults (flags and the environment still win)."""
    if not value:
        return value
    import tomllib

    try:
        with open(value, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{value}: cannot read config file ({exc})") from None
    for secret in ("password", "secret", "aws_secret_access_key", "private_key"):
        if secret in data:
            raise ConfigError(f"{value}: secrets do not belong in a config file ({secret}); use the environment")
    ctx.default_map = {**(ctx.default_map or {}), **{k.replace("-", "_"): v for k, v in data.items()}}
    return value


# `fedfs init` and `fedfs simulate` both set the async trigger (fedfs.rounds.decide_aggregation)
buffer_trigger_option = click.option(
    "--buffer-trigger", type=click.Choice(["fresh", "any"]), default="fresh", show_default=True,
    help="Async: fresh: K counts updates trained from the current global (stale ones ride along); "
         "any: the K-th update of any age (classic FedBuff).")


def opt(*decls: str, **kw: Any):
    """click.option with ``FEDFS_<NAME>`` as its environment variable."""
    names = [d for d in decls if not d.startswith("-")]
    longs = [d for d in decls if d.startswith("--")]
    name = names[0] if names else (longs[0][2:] if longs else decls[0].lstrip("-"))
    kw.setdefault("envvar", "FEDFS_" + name.upper().replace("-", "_"))
    kw.setdefault("show_envvar", False)
    return click.option(*decls, **kw)


def common(f):
    """Options every role command takes."""
    for deco in reversed([
        click.argument("url", envvar="FEDFS_URL", required=False),
        opt("--key", "key", type=click.Path(dir_okay=False), help="This party's private key (from `fedfs keygen`)."),
        opt("--workdir", type=click.Path(file_okay=False), help="Local state and cache (default ~/.local/share/fedfs/...)."),
        opt("--federation-digest", "federation_digest", help="Expected sha256 of federation.json (printed by `fedfs init`)."),
        opt("-so", "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
            envvar=None, help="Backend option, e.g. -so endpoint_url=http://127.0.0.1:9000 (repeatable; also FEDFS_STORAGE_OPTIONS as JSON)."),
        click.option("--config", type=click.Path(dir_okay=False, exists=True), callback=_load_config,
                     is_eager=True, expose_value=False, help="TOML file with option defaults."),
        opt("-q", "--quiet", is_flag=True, help="Only warnings and errors."),
    ]):
        f = deco(f)
    return f


def nnunet_options(f):
    """The nnUNetv2_plan_and_preprocess / nnUNetv2_train options a site takes."""
    for deco in reversed([
        opt("-d", "dataset", required=False, help="nnU-Net dataset id or name, as for nnUNetv2_train."),
        opt("-c", "configuration", default=None, help="nnU-Net configuration (default: the federation's)."),
        opt("-f", "fold", default="0", show_default=True, help="Fold (0-4 or 'all')."),
        opt("-tr", "trainer", default="nnUNetTrainer", show_default=True,
            help="Trainer class; classes in nnUNet_extTrainer folders are found too."),
        opt("-p", "plans", default="nnUNetPlans", show_default=True, help="Plans identifier."),
        opt("-pl", "planner", default="ExperimentPlanner", show_default=True, help="Experiment planner class."),
        opt("-gpu_memory_target", "gpu_memory_target", type=float, default=None, help="GPU memory target (GB) for planning."),
        opt("-device", "device", type=click.Choice(["cpu", "cuda", "mps"]), default="cuda" if _has_cuda_hint() else "cpu",
            show_default=True),
        opt("-np", "num_processes", type=int, default=None, help="Processes for preprocessing."),
        opt("-npfp", "num_processes_fingerprint", type=int, default=None, help="Processes for fingerprinting."),
        opt("--verify_dataset_integrity", "verify_dataset_integrity", is_flag=True),
        opt("--iterations-per-epoch", "iterations_per_epoch", type=int, default=None,
            help="Override the trainer's 250 training iterations per epoch."),
        opt("--val-iterations", "val_iterations", type=int, default=None,
            help="Override the trainer's 50 validation iterations per epoch."),
        opt("--no-final-validation", "no_final_validation", is_flag=True,
            help="Skip nnU-Net's final validation after the last round."),
    ]):
        f = deco(f)
    return f


def watch_options(f):
    for deco in reversed([
        opt("--watch", type=click.Choice(["auto", "inotify", "poll"]), default="auto", show_default=True,
            help="auto: inotify on local disks, polling on NFS/CIFS mounts, S3 and SMB."),
        opt("--poll-interval", type=float, default=5.0, show_default=True, help="Seconds between polls."),
    ]):
        f = deco(f)
    return f


def _log_changes(name: str):
    """A step-result logger that repeats a line only when it changes (polls are frequent)."""
    logger = logging.getLogger(name)
    last = {"line": None}

    def log(result: object) -> None:
        line = str(result)
        if line != last["line"]:
            logger.info("%s", line)
            last["line"] = line

    return log


def _has_cuda_hint() -> bool:
    return os.path.exists("/dev/nvidiactl")


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S")


def _open(url: str | None, key: str | None, pin: str | None, storage_options: tuple[str, ...]):
    from .cli import _storage_options
    from .federation import Federation

    if not url:
        raise ConfigError("no bucket URL: give it as an argument, in FEDFS_URL or as url in --config")
    if not key:
        raise ConfigError("no private key: give --key, FEDFS_KEY or key in --config")
    return Federation.open(url, storage_options=_storage_options(storage_options), identity=key, pin=pin)


def _workdir(workdir: str | None, fed) -> Path:
    if workdir:
        return Path(workdir)
    base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "fedfs"
    return base / fed.config.federation_id[:16] / fed.identity.name


def make_site(url, key, workdir, federation_digest, storage_options, dataset, configuration, fold, trainer, plans, planner,
              gpu_memory_target, device, num_processes, num_processes_fingerprint, verify_dataset_integrity,
              iterations_per_epoch, val_iterations, no_final_validation, **_ignored):
    from .nnunet_work import NnunetOptions, NnunetWork
    from .site import Site

    fed = _open(url, key, federation_digest, storage_options)
    if not dataset:
        raise ConfigError("no dataset: give -d (nnU-Net dataset id or name), FEDFS_DATASET or dataset in --config")
    conf = configuration or fed.config.configuration
    if conf != fed.config.configuration:
        raise ConfigError(f"the federation trains {fed.config.configuration!r}, not {conf!r}")
    work = NnunetWork(NnunetOptions(
        dataset=str(dataset), configuration=conf, fold=fold, trainer=trainer, plans=plans, planner=planner,
        gpu_memory_target=gpu_memory_target, device=device, num_processes=num_processes,
        num_processes_fingerprint=num_processes_fingerprint, verify_dataset_integrity=verify_dataset_integrity,
        iterations_per_epoch=iterations_per_epoch, val_iterations=val_iterations,
        validate=not no_final_validation), mode=fed.config.mode)
    return Site(fed, work, _workdir(workdir, fed))


@click.group(context_settings=CONTEXT)
def site() -> None:
    """Commands a hospital runs: fingerprint, plan, then train rounds.

    \b
    Example (a daemon that does everything, reacting to new files):
      fedfs site run s3://fed-bucket/liver --key keys/A.key -d 501
    """


@site.command("fingerprint", context_settings=CONTEXT)
@common
@nnunet_options
def site_fingerprint(**kw: Any) -> None:
    """Publish this site's case count, then (once the aggregator's census is out) its
    fingerprint summary; exit. FFE only.

    \b
    Example:
      fedfs site fingerprint /mnt/share/fed --key keys/A.key -d 501 -npfp 4
    """
    _setup_logging(kw["quiet"])
    s = make_site(**kw)
    if s.config.mode != "ffe":
        raise ConfigError("fingerprints are merged in FFE mode only; in asym mode `fedfs site plan` plans locally")
    _repeat(s, stop_at={"planned"}, phases={"census", "fingerprint"})


@site.command("plan", context_settings=CONTEXT)
@common
@nnunet_options
def site_plan(**kw: Any) -> None:
    """Fingerprint if still due, then plan and preprocess with nnU-Net (from the merged
    fingerprint in FFE, the local one in asym) and publish the plans digest; exit.

    \b
    Example:
      fedfs site plan /mnt/share/fed --key keys/A.key -d 501 -pl ExperimentPlanner -np 4
    """
    _setup_logging(kw["quiet"])
    _repeat(make_site(**kw), stop_at={"planned"}, phases={"census", "fingerprint", "planned"})


def _repeat(s, stop_at: set[str], phases: set[str]) -> None:
    while True:
        r = s.step()
        click.echo(str(r))
        if r.action in stop_at or r.action not in phases:
            return


@site.command("step", context_settings=CONTEXT)
@common
@nnunet_options
def site_step(**kw: Any) -> None:
    """Do whatever is due now and exit 0; for cron.

    A step resumes nnU-Net from its own checkpoint, so cron may call it every
    few minutes; a step that finds nothing due exits at once.

    \b
    Example (crontab):
      */5 * * * * flock -n /tmp/fedfs-site.lock fedfs site step --config /etc/fedfs/site.toml
    """
    _setup_logging(kw["quiet"])
    s = make_site(**kw)
    try:
        while True:  # everything that is due now: e.g. plan, then train the round v0 allows
            r = s.step()
            click.echo(str(r))
            if r.action in ("wait", "done", "finished"):
                break
    finally:
        s.work.close()


@site.command("run", context_settings=CONTEXT)
@common
@nnunet_options
@watch_options
def site_run(watch: str, poll_interval: float, **kw: Any) -> None:
    """Run as a daemon: the whole pipeline, then a round whenever a new global appears.

    \b
    Example (systemd ExecStart):
      fedfs site run --config /etc/fedfs/site.toml
    """
    from .watch import make_trigger, run_loop

    _setup_logging(kw["quiet"])
    s = make_site(**kw)
    trigger = make_trigger(s.fed.store, watch=watch, poll_interval=poll_interval)
    logging.getLogger("fedfs").info("site %s watching %s (%s)", s.name, s.fed.store.url, trigger.kind)
    try:
        result = run_loop(s.step, trigger, on_result=_log_changes("fedfs.site"))
        click.echo(str(result))
    finally:
        trigger.close()
        s.work.close()


def make_aggregator(url, key, workdir, federation_digest, storage_options, **_ignored):
    from .aggregator import Aggregator

    fed = _open(url, key, federation_digest, storage_options)
    return Aggregator(fed, _workdir(workdir, fed))


@click.group(context_settings=CONTEXT)
def aggregator() -> None:
    """Commands the coordinator runs: merge fingerprints, check plans, average updates.

    \b
    Example:
      fedfs aggregator run s3://fed-bucket/liver --key keys/coordinator.key
    """


@aggregator.command("step", context_settings=CONTEXT)
@common
def aggregator_step(**kw: Any) -> None:
    """Do whatever is due now and exit 0; for cron.

    \b
    Example (crontab):
      * * * * * flock -n /tmp/fedfs-agg.lock fedfs aggregator step --config /etc/fedfs/aggregator.toml
    """
    _setup_logging(kw["quiet"])
    a = make_aggregator(**kw)
    while True:
        r = a.step()
        click.echo(str(r))
        if r.action in ("wait", "finished", "blocked"):
            break


@aggregator.command("run", context_settings=CONTEXT)
@common
@watch_options
def aggregator_run(watch: str, poll_interval: float, **kw: Any) -> None:
    """Run as a daemon until the final global is published.

    \b
    Example:
      fedfs aggregator run /mnt/share/fed --key keys/coordinator.key --watch poll --poll-interval 10
    """
    from .watch import make_trigger, run_loop

    _setup_logging(kw["quiet"])
    a = make_aggregator(**kw)
    trigger = make_trigger(a.fed.store, watch=watch, poll_interval=poll_interval)
    logging.getLogger("fedfs").info("aggregator watching %s (%s)", a.fed.store.url, trigger.kind)
    try:
        result = run_loop(a.step, trigger, on_result=_log_changes("fedfs.aggregator"))
        click.echo(str(result))
    finally:
        trigger.close()


@click.command(context_settings=CONTEXT)
@click.option("--site", "site_specs", multiple=True, required=True, metavar="NAME=DATASET",
              help="A site and its nnU-Net dataset (repeat per site), e.g. --site A=501.")
@click.option("--bucket", default=None, help="Bucket URL (default: a folder in --dir).")
@click.option("--dir", "workdir", default=None, type=click.Path(file_okay=False),
              help="Keys, logs and work folders (default: a new temporary folder).")
@click.option("--mode", type=click.Choice(["ffe", "asym", "fedavg"]), default="ffe", show_default=True)
@click.option("--aggregation", type=click.Choice(["sync", "async"]), default="sync", show_default=True)
@click.option("--rounds", type=int, default=2, show_default=True)
@click.option("--local-epochs", type=int, default=1, show_default=True)
@click.option("--buffer-size", type=int, default=0, help="FedBuff K (async); 0 = number of sites.")
@buffer_trigger_option
@click.option("--staleness", type=click.Choice(["inverse_sqrt", "constant", "polynomial", "hinge"]),
              default="inverse_sqrt", show_default=True, help="Async: weight of a stale update (see `fedfs init`).")
@click.option("--staleness-a", type=float, default=0.5, show_default=True, help="Async: a of --staleness.")
@click.option("--staleness-b", type=float, default=4.0, show_default=True, help="Async: b of --staleness hinge.")
@click.option("-c", "configuration", default="2d", show_default=True)
@click.option("-f", "fold", default="0", show_default=True)
@click.option("-tr", "trainer", default="nnUNetTrainer", show_default=True)
@click.option("--iterations-per-epoch", type=int, default=None)
@click.option("--val-iterations", type=int, default=None)
@click.option("--no-final-validation", is_flag=True)
@click.option("--poll-interval", type=float, default=1.0, show_default=True)
@click.option("--timeout", "timeout_s", type=float, default=3600.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary at the end.")
def simulate(site_specs, bucket, workdir, mode, aggregation, rounds, local_epochs, buffer_size, buffer_trigger,
             staleness, staleness_a, staleness_b, configuration,
             fold, trainer, iterations_per_epoch, val_iterations, no_final_validation, poll_interval, timeout_s,
             as_json) -> None:
    """Simulate a federation on one machine: the aggregator and each site as its own process.

    nnU-Net's folders come from nnUNet_raw / nnUNet_preprocessed / nnUNet_results
    (default: under --dir).

    \b
    Example:
      fedfs simulate --site A=501 --site B=502 --site C=503 --rounds 3 -tr nnUNetTrainerFedfsTiny
    """
    import json
    import tempfile

    from .simulate import SimulationSpec, nnunet_environment
    from .simulate import simulate as run_simulation

    datasets = {}
    for item in site_specs:
        if "=" not in item:
            raise ConfigError(f"--site {item!r} must look like NAME=DATASET")
        name, ds = item.split("=", 1)
        datasets[name] = ds
    root = Path(workdir or tempfile.mkdtemp(prefix="fedfs-sim-"))
    spec = SimulationSpec(datasets=datasets, mode=mode, rounds=rounds, local_epochs=local_epochs,
                          aggregation=aggregation, buffer_size=buffer_size, buffer_trigger=buffer_trigger,
                          staleness=staleness, staleness_a=staleness_a, staleness_b=staleness_b,
                          configuration=configuration, fold=fold,
                          trainer=trainer, iterations_per_epoch=iterations_per_epoch, val_iterations=val_iterations,
                          final_validation=not no_final_validation, poll_interval=poll_interval)
    result = run_simulation(spec, workdir=root, bucket=bucket, env=nnunet_environment(root),
                            echo=None if as_json else click.echo, timeout_s=timeout_s)
    if as_json:
        click.echo(json.dumps(result, indent=2))


@click.command(context_settings=CONTEXT)
@common
@opt("-d", "dataset", required=False, help="This site's nnU-Net dataset id or name.")
@opt("-c", "configuration", default=None)
@opt("-f", "fold", default="0", show_default=True)
@opt("-tr", "trainer", default="nnUNetTrainer", show_default=True)
@opt("-p", "plans", default="nnUNetPlans", show_default=True)
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Model folder to write (or nnUNet_results root with --results-layout).")
@click.option("--results-layout", is_flag=True,
              help="Write under OUT/DatasetXXX/Trainer__Plans__conf so `nnUNetv2_predict -d` finds it with nnUNet_results=OUT.")
@click.option("--allow-unfinished", is_flag=True, help="Export the newest global even if training is not over.")
def export(url, key, workdir, federation_digest, storage_options, quiet, dataset, configuration, fold, trainer, plans, out_dir,
           results_layout, allow_unfinished) -> None:
    """Export this site's final model as an nnU-Net trained-model folder.

    FFE: the final global model; asym: this site's personalised model.

    \b
    Example:
      fedfs export s3://fed-bucket/liver --key keys/A.key -d 501 -o models/liver
      nnUNetv2_predict_from_modelfolder -i imagesTs -o preds -m models/liver -f 0
    """
    from .export import export_site_model

    _setup_logging(quiet)
    fed = _open(url, key, federation_digest, storage_options)
    if not dataset:
        raise ConfigError("no dataset: give -d, FEDFS_DATASET or dataset in --config")
    folder = export_site_model(fed, fed.identity.name, str(dataset), out_dir, configuration=configuration,
                               fold=fold, trainer=trainer, plans=plans,
                               in_results=out_dir if results_layout else None, require_final=not allow_unfinished)
    click.echo(f"exported {folder}")
