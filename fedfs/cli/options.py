"""The options every ``fedfs`` command shares, in one place.

Every option of a role command may also come from the environment (``FEDFS_<OPTION>``,
e.g. ``FEDFS_DATASET``) or from a TOML file given with ``--config`` (keys are option
names, e.g. ``dataset = "501"``); unknown keys and variables are errors (:mod:`.strict`).
Choices come from the protocol's vocabulary (:mod:`fedfs.protocol.schema`), so the CLI
never re-types a mode or a rule.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..errors import ConfigError
from ..protocol.schema import AGGREGATIONS, ALIGNS, BUFFER_TRIGGERS, MODES, ROLES, RULES, STALENESS, WEIGHTINGS

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
STORAGE_HELP = ("Backend option, e.g. -so endpoint_url=http://127.0.0.1:9000 (repeatable; "
                "also FEDFS_STORAGE_OPTIONS as JSON).")
DIGEST_HELP = "Expected sha256 of federation.json (printed by `fedfs init`)."
NO_URL = "no bucket URL: give it as an argument, in FEDFS_URL or as url in --config"

mode_choice = click.Choice(list(MODES))
aggregation_choice = click.Choice(list(AGGREGATIONS))
staleness_choice = click.Choice(list(STALENESS))
weighting_choice = click.Choice(list(WEIGHTINGS))
align_choice = click.Choice(list(ALIGNS))
role_choice = click.Choice(list(ROLES))


def load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """``--config FILE``: TOML keys become option defaults (flags and the environment still win).
    An unknown key or ``FEDFS_*`` variable is an error (:mod:`fedfs.cli.strict`)."""
    from .strict import check_environment, config_defaults

    if not ctx.resilient_parsing:
        check_environment(os.environ, ctx)
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
    ctx.default_map = {**(ctx.default_map or {}), **config_defaults(value, data, ctx)}
    return value


def opt(*decls: str, **kw: Any):
    """click.option with ``FEDFS_<NAME>`` as its environment variable."""
    names = [d for d in decls if not d.startswith("-")]
    longs = [d for d in decls if d.startswith("--")]
    name = names[0] if names else (longs[0][2:] if longs else decls[0].lstrip("-"))
    kw.setdefault("envvar", "FEDFS_" + name.upper().replace("-", "_"))
    kw.setdefault("show_envvar", False)
    return click.option(*decls, **kw)


def apply(decorators: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    """One decorator from a list, applied so the options appear in list order."""

    def wrap(f: Any) -> Any:
        for deco in reversed(decorators):
            f = deco(f)
        return f

    return wrap


url_argument = click.argument("url", envvar="FEDFS_URL")
optional_url = click.argument("url", envvar="FEDFS_URL", required=False)
storage_option = click.option("-so", "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
                              help=STORAGE_HELP)
config_option = click.option("--config", type=click.Path(dir_okay=False, exists=True), callback=load_config,
                             is_eager=True, expose_value=False, help="TOML file with option defaults.")
_env_storage_option = opt("-so", "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
                          envvar=None, help=STORAGE_HELP)
_pin_option = opt("--federation-digest", "pin", envvar="FEDFS_FEDERATION_DIGEST", help=DIGEST_HELP)

#: Options every role command takes.
common = apply([
    optional_url,
    opt("--key", "key", type=click.Path(dir_okay=False), help="This party's private key (from `fedfs keygen`)."),
    opt("--workdir", type=click.Path(file_okay=False), help="Local state and cache (default ~/.local/share/fedfs/...)."),
    opt("--federation-digest", "federation_digest", help=DIGEST_HELP),
    _env_storage_option,
    config_option,
    opt("-q", "--quiet", is_flag=True, help="Only warnings and errors."),
])

#: What a read-only command takes after its URL (no key): status, report, bundle.
pin_storage_config = apply([_pin_option, _env_storage_option, config_option])
readonly_options = apply([optional_url, pin_storage_config])


#: The nnUNetv2_plan_and_preprocess / nnUNetv2_train options a site takes.
nnunet_options = apply([
    opt("-d", "dataset", required=False, help="nnU-Net dataset id or name, as for nnUNetv2_train."),
    opt("-c", "configuration", default=None, help="nnU-Net configuration (default: the federation's)."),
    opt("-f", "fold", default=None, help="Fold (0-4 or 'all'; default: the federation's; another one is an error)."),
    opt("-tr", "trainer", default="nnUNetTrainer", show_default=True,
        help="Trainer class; classes in nnUNet_extTrainer folders are found too."),
    opt("-p", "plans", default=None,
        help="Plans identifier (default: the federation's; another one is an error)."),
    opt("-pl", "planner", default=None,
        help="Experiment planner class (default: the federation's; another one is an error)."),
    opt("-gpu_memory_target", "gpu_memory_target", type=float, default=None, help="GPU memory target (GB) for planning."),
    opt("-device", "device", type=click.Choice(["cpu", "cuda", "mps"]), default=None,
        help="As nnUNetv2_train -device (default: cuda). Unset and no CUDA device: the CPU, with a warning "
             "at start; an explicit cuda or mps that torch cannot use is an error. Pick the GPU with "
             "CUDA_VISIBLE_DEVICES."),
    opt("--num-gpus", "-num_gpus", "num_gpus", type=int, default=1, show_default=True,
        help="As nnUNetv2_train -num_gpus: train each round with nnU-Net's DDP over N GPUs (N processes in "
             "lockstep, rank 0 publishes). Needs -device cuda and N visible GPUs; 1 trains in this process."),
    opt("-np", "num_processes", type=int, default=None, help="Processes for preprocessing."),
    opt("-npfp", "num_processes_fingerprint", type=int, default=None, help="Processes for fingerprinting."),
    opt("--verify_dataset_integrity", "verify_dataset_integrity", is_flag=True),
    opt("--iterations-per-epoch", "iterations_per_epoch", type=int, default=None,
        help="Override the trainer's 250 training iterations per epoch."),
    opt("--val-iterations", "val_iterations", type=int, default=None,
        help="Override the trainer's 50 validation iterations per epoch."),
    opt("--no-final-validation", "no_final_validation", is_flag=True,
        help="Skip nnU-Net's final validation after the last round."),
])

#: What `fedfs init` fixes for every site's nnU-Net (federation.json).
init_nnunet_options = apply([
    click.option("-pl", "--planner", default="ExperimentPlanner", show_default=True,
                 help="nnU-Net experiment planner every site plans with, e.g. nnUNetPlannerResEncM (ResEnc "
                      "presets M/L/XL; docs/nnunet.md)."),
    click.option("-p", "--plans-identifier", "plans_identifier", default=None,
                 help="Plans identifier every site trains (default: the one the planner writes, e.g. "
                      "nnUNetResEncUNetMPlans for nnUNetPlannerResEncM; another name is passed to the planner as "
                      "-overwrite_plans_name)."),
    click.option("--folds", default="0", show_default=True,
                 help="nnU-Net fold(s) to train: 0-4, a list such as 0,2, or all. Several folds make one federation "
                      "per fold at URL/fold_K, with the same settings (docs/nnunet.md, Folds)."),
    click.option("--pretrained-weights", "pretrained_weights", default=None, type=click.Path(exists=True),
                 help="Start from these weights (nnUNetv2_train -pretrained_weights): an nnU-Net checkpoint "
                      "(.pth, read here with weights_only=True), an exported model folder or .safetensors; stored "
                      "in the bucket as safetensors, checked by each site against its plans (segmentation heads "
                      "of another label count are skipped)."),
])

watch_options = apply([
    opt("--watch", type=click.Choice(["auto", "inotify", "poll"]), default="auto", show_default=True,
        help="auto: inotify on local disks, polling on NFS/CIFS mounts, S3 and SMB."),
    opt("--poll-interval", type=float, default=5.0, show_default=True, help="Seconds between polls."),
])

# `fedfs init` and `fedfs simulate` both set these (fedfs.protocol.rounds.decide_aggregation)
buffer_trigger_option = click.option(
    "--buffer-trigger", type=click.Choice(list(BUFFER_TRIGGERS)), default="fresh", show_default=True,
    help="Async: fresh: K counts updates trained from the current global (stale ones ride along); "
         "any: the K-th update of any age (classic FedBuff).")
buffer_size_option = click.option("--buffer-size", type=int, default=0, help="FedBuff K (async); 0 = number of sites.")
staleness_ab_options = apply([
    click.option("--staleness-a", type=float, default=0.5, show_default=True, help="Async: a of --staleness."),
    click.option("--staleness-b", type=float, default=4.0, show_default=True, help="Async: b of --staleness hinge."),
])

#: `fedfs init`: the aggregation rule and differential privacy (docs/privacy.md).
privacy_options = apply([
    click.option("--rule", type=click.Choice(list(RULES)), default="fedavg", show_default=True,
                 help="fedavg: the weighted mean; median / trimmed_mean: coordinate-wise, robust against a "
                      "minority of poisoned updates (sync only; not with secure aggregation)."),
    click.option("--trim-fraction", type=float, default=0.1, show_default=True,
                 help="trimmed_mean: the fraction of updates dropped at each end of every coordinate."),
    click.option("--dp-epsilon", type=float, default=0.0,
                 help="DP-FedAvg: the whole federation's epsilon (0 = off); needs --clip and --weighting uniform. "
                      "The noise multiplier is derived for --rounds rounds."),
    click.option("--dp-delta", type=float, default=None, help="DP-FedAvg: delta (default 1e-5)."),
    click.option("--clip", "dp_clip", type=float, default=0.0,
                 help="DP-FedAvg: each site's update (trained - base) is clipped to this L2 norm."),
    click.option("--secure-aggregation", is_flag=True,
                 help="SecAgg+ over the bucket: the aggregator learns only the sum of each round's updates and the "
                      "pooled FFE fingerprint (sync, ffe or fedavg, at least 3 sites; docs/secure-aggregation.md)."),
])


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S")


def storage_options_of(pairs: tuple[str, ...]) -> dict[str, Any]:
    from ..store.options import parse_storage_options

    return parse_storage_options(pairs)


def open_readonly(url: str | None, pin: str | None, storage_options: tuple[str, ...]):
    """Open a federation without a key (read-only commands: status, report, bundle)."""
    from ..federation import Federation

    if not url:
        raise ConfigError(NO_URL)
    return Federation.open(url, storage_options=storage_options_of(storage_options), pin=pin)


def open_party(url: str | None, key: str | None, pin: str | None, storage_options: tuple[str, ...]):
    """Open a federation acting as the party whose private key is ``key``."""
    if not url:
        raise ConfigError(NO_URL)
    if not key:
        raise ConfigError("no private key: give --key, FEDFS_KEY or key in --config")
    return open_readonly(url, pin, storage_options).as_party(key)


def default_workdir(workdir: str | None, fed: Any) -> Path:
    if workdir:
        return Path(workdir)
    base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "fedfs"
    return base / fed.config.federation_id[:16] / fed.identity.name
