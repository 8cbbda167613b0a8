"""``fedfs site ...`` and ``fedfs aggregator ...``: the role commands (registered by :mod:`fedfs.cli.app`).

Options mirror nnU-Net's where they mean the same thing; see :mod:`fedfs.cli.options`
for the environment (``FEDFS_<OPTION>``) and ``--config`` TOML forms.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import click

from ..errors import Blocked, ConfigError
from .options import CONTEXT, common, default_workdir, nnunet_options, open_party, setup_logging, watch_options


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


def _cron_step(role: Any, until: Callable[[Any], bool] | None = None) -> None:
    """Everything due now, each result echoed: the roles' one loop with no trigger, so it returns at
    the first idle, blocked or terminal result (or at ``until``). Blocked raises :class:`Blocked`
    (exit 10, the reason printed); a daemon would keep polling instead."""
    from ..roles.loop import run_loop

    result = run_loop(role.step, until=until, on_result=lambda r: click.echo(str(r)))
    if result is not None and result.action.blocked:
        raise Blocked(result.detail)


def _daemon(role: Any, watch: str, poll_interval: float, who: str, logger: str) -> None:
    """Step ``role`` until it is done, waking on new files (the same loop as a cron step, with a trigger).
    Its heartbeat is refreshed every minute meanwhile, whatever the poll interval (a live daemon is never
    shown as silent)."""
    from ..roles.loop import run_loop
    from ..store.watch import make_trigger

    store = role.fed.store
    trigger = make_trigger(store, watch=watch, poll_interval=poll_interval)
    logging.getLogger("fedfs").info("%s watching %s (%s)", who, store.url, trigger.kind)
    try:
        with role.liveness.alive():
            click.echo(str(run_loop(role.step, trigger, on_result=_log_changes(logger))))
    finally:
        trigger.close()


def _set_up_only(result: Any) -> bool:
    """Where `site fingerprint` and `site plan` stop: at anything but a census or fingerprint just published."""
    return result.action not in ("census", "fingerprint")


def _training_device(device: str | None) -> str:
    """The device a site trains on, said once at start, and ``nnUNet_n_proc_DA`` when it is unset
    (docs/site-guide.md): resolved here, at run time, so ``fedfs --help`` never imports torch."""
    import os

    from ..nnunet.build import NO_CUDA, default_n_proc_da, resolve_device

    name, line = resolve_device(device)
    log = logging.getLogger("fedfs.nnunet")
    (log.warning if line == NO_CUDA else log.info)("%s", line)
    if not os.environ.get("nnUNet_n_proc_DA"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["nnUNet_n_proc_DA"] = str(default_n_proc_da(name, cores))
        log.info("nnUNet_n_proc_DA unset: %s data augmentation workers (%s on %d cores; set it to override)",
                 os.environ["nnUNet_n_proc_DA"], name, cores)
    return name


def make_site(url: str | None, key: str | None, workdir: str | None, federation_digest: str | None,
              storage_options: tuple[str, ...], *, dataset: str | None, configuration: str | None,
              no_final_validation: bool, **nnunet: Any):
    """The site a role command acts as: ``nnunet`` holds the remaining nnU-Net options by name
    (the fields of :class:`~fedfs.nnunet.work.NnunetOptions`); other keys are ignored."""
    import dataclasses

    from ..nnunet.work import NnunetOptions, NnunetWork

    fed = open_party(url, key, federation_digest, storage_options)
    if not dataset:
        raise ConfigError("no dataset: give -d (nnU-Net dataset id or name), FEDFS_DATASET or dataset in --config")
    conf = configuration or fed.config.configuration
    if conf != fed.config.configuration:
        raise ConfigError(f"the federation trains {fed.config.configuration!r}, not {conf!r}")
    nnunet["device"] = _training_device(nnunet.get("device"))
    from ..nnunet.ddp import check_num_gpus

    check_num_gpus(nnunet.get("num_gpus", 1), nnunet["device"])  # before any set-up: a typo costs nothing
    fields = {f.name for f in dataclasses.fields(NnunetOptions)}
    options = NnunetOptions(dataset=str(dataset), configuration=conf, validate=not no_final_validation,
                            **{k: v for k, v in nnunet.items() if k in fields})
    return fed.site(NnunetWork(options, mode=fed.config.mode), default_workdir(workdir, fed))  # settles -pl/-p


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
@click.option("--redo", is_flag=True,
              help="Before training starts: read the dataset again and supersede this site's census (or, if it "
                   "is unchanged, its fingerprint summary), e.g. after correcting the dataset.")
def site_fingerprint(redo: bool, **kw: Any) -> None:
    """Publish this site's census (case and channel counts, label and channel names), then
    (once the aggregator's census is out) its fingerprint summary; exit. FFE only.

    The dataset is checked first (every image has its label file, every channel its
    image). With --redo, a corrected dataset supersedes what was published; the
    aggregator then merges again. After the initial global v0 it is refused: a
    corrected dataset then needs a new federation. With secure aggregation the
    counts and intensity histograms go into masked sums (only the case geometry
    is published in the clear; intensities must be integers) and --redo is refused.

    \b
    Example:
      fedfs site fingerprint /mnt/share/fed --key keys/A.key -d 501 -npfp 4
      fedfs site fingerprint /mnt/share/fed --key keys/A.key -d 501 --redo
    """
    setup_logging(kw["quiet"])
    s = make_site(**kw)
    if s.config.mode != "ffe":
        raise ConfigError("fingerprints are merged in FFE mode only; in asym mode `fedfs site plan` plans locally")
    if redo:
        click.echo(s.setup.redo())
    _cron_step(s, until=_set_up_only)


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
    setup_logging(kw["quiet"])
    _cron_step(make_site(**kw), until=_set_up_only)


@site.command("step", context_settings=CONTEXT)
@common
@nnunet_options
def site_step(**kw: Any) -> None:
    """Do whatever is due now and exit 0; for cron.

    A step resumes nnU-Net from its own checkpoint, so cron may call it every
    few minutes; a step that finds nothing due exits at once. A blocked step
    (a rejected file, a configuration the plans lack) exits 10 with the reason.

    \b
    Example (crontab):
      */5 * * * * flock -n /tmp/fedfs-site.lock fedfs site step --config /etc/fedfs/site.toml
    """
    setup_logging(kw["quiet"])
    s = make_site(**kw)
    try:
        _cron_step(s)  # everything that is due now: e.g. plan, then train the round v0 allows
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
    setup_logging(kw["quiet"])
    s = make_site(**kw)
    try:
        _daemon(s, watch, poll_interval, f"site {s.name}", "fedfs.roles.site")
    finally:
        s.work.close()


def make_aggregator(url, key, workdir, federation_digest, storage_options, **_ignored):
    from ..roles.aggregator import Aggregator

    fed = open_party(url, key, federation_digest, storage_options)
    return Aggregator(fed, default_workdir(workdir, fed))


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

    A blocked step (sites whose plans differ, a merge that fails) exits 10 with the reason.

    \b
    Example (crontab):
      * * * * * flock -n /tmp/fedfs-agg.lock fedfs aggregator step --config /etc/fedfs/aggregator.toml
    """
    setup_logging(kw["quiet"])
    _cron_step(make_aggregator(**kw))


@aggregator.command("run", context_settings=CONTEXT)
@common
@watch_options
def aggregator_run(watch: str, poll_interval: float, **kw: Any) -> None:
    """Run as a daemon until the final global is published.

    \b
    Example:
      fedfs aggregator run /mnt/share/fed --key keys/coordinator.key --watch poll --poll-interval 10
    """
    setup_logging(kw["quiet"])
    _daemon(make_aggregator(**kw), watch, poll_interval, "aggregator", "fedfs.roles.aggregator")
