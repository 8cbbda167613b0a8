"""``fedfs simulate``, ``export``, ``status``, ``report`` and ``bundle``: thin commands over :mod:`fedfs.ops`."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import click

from ..errors import ConfigError
from .options import (
    CONTEXT,
    aggregation_choice,
    buffer_size_option,
    buffer_trigger_option,
    common,
    mode_choice,
    open_party,
    open_readonly,
    opt,
    optional_url,
    pin_storage_config,
    readonly_options,
    setup_logging,
    staleness_ab_options,
    staleness_choice,
    storage_options_of,
)


@click.command(context_settings=CONTEXT)
@click.option("--site", "site_specs", multiple=True, required=True, metavar="NAME=DATASET",
              help="A site and its nnU-Net dataset (repeat per site), e.g. --site A=501.")
@click.option("--bucket", default=None, help="Bucket URL (default: a folder in --dir).")
@click.option("--dir", "workdir", default=None, type=click.Path(file_okay=False),
              help="Keys, logs and work folders (default: a new temporary folder).")
@click.option("--mode", type=mode_choice, default="ffe", show_default=True)
@click.option("--aggregation", type=aggregation_choice, default="sync", show_default=True)
@click.option("--rounds", type=int, default=2, show_default=True)
@click.option("--local-epochs", type=int, default=1, show_default=True)
@buffer_size_option
@buffer_trigger_option
@click.option("--staleness", type=staleness_choice,
              default="inverse_sqrt", show_default=True, help="Async: weight of a stale update (see `fedfs init`).")
@staleness_ab_options
@click.option("-c", "configuration", default="2d", show_default=True)
@click.option("-f", "fold", default="0", show_default=True)
@click.option("-tr", "trainer", default="nnUNetTrainer", show_default=True)
@click.option("--iterations-per-epoch", type=int, default=None)
@click.option("--val-iterations", type=int, default=None)
@click.option("--no-final-validation", is_flag=True)
@click.option("--poll-interval", type=float, default=1.0, show_default=True)
@click.option("--timeout", "timeout_s", type=float, default=3600.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary at the end.")
def simulate(site_specs, bucket, workdir, as_json, timeout_s, no_final_validation, **settings) -> None:
    """Simulate a federation on one machine: the aggregator and each site as its own process.

    nnU-Net's folders come from nnUNet_raw / nnUNet_preprocessed / nnUNet_results
    (default: under --dir).

    \b
    Example:
      fedfs simulate --site A=501 --site B=502 --site C=503 --rounds 3 -tr nnUNetTrainerFedfsTiny
    """
    import tempfile

    from ..ops.simulate import SimulationSpec, nnunet_environment
    from ..ops.simulate import simulate as run_simulation

    datasets = {}
    for item in site_specs:
        if "=" not in item:
            raise ConfigError(f"--site {item!r} must look like NAME=DATASET")
        name, ds = item.split("=", 1)
        datasets[name] = ds
    root = Path(workdir or tempfile.mkdtemp(prefix="fedfs-sim-"))
    spec = SimulationSpec(datasets=datasets, final_validation=not no_final_validation, **settings)
    result = run_simulation(spec, workdir=root, bucket=bucket, env=nnunet_environment(root),
                            echo=None if as_json else click.echo, timeout_s=timeout_s)
    if as_json:
        click.echo(json.dumps(result, indent=2))


@click.command(context_settings=CONTEXT)
@common
@opt("-d", "dataset", required=False, help="This site's nnU-Net dataset id or name.")
@opt("-c", "configuration", default=None)
@opt("-f", "fold", default=None, help="Fold folder to write (default: the federation's).")
@opt("-tr", "trainer", default="nnUNetTrainer", show_default=True)
@opt("-p", "plans", default=None, help="Plans identifier (default: the federation's).")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Model folder to write (or nnUNet_results root with --results-layout).")
@click.option("--results-layout", is_flag=True,
              help="Write under OUT/DatasetXXX/Trainer__Plans__conf so `nnUNetv2_predict -d` finds it with nnUNet_results=OUT.")
@click.option("--allow-unfinished", is_flag=True, help="Export the newest global even if training is not over.")
def export(url, key, workdir, federation_digest, storage_options, quiet, dataset, configuration, fold, trainer, plans,
           out_dir, results_layout, allow_unfinished) -> None:
    """Export this site's final model as an nnU-Net trained-model folder.

    FFE: the final global model; asym: this site's personalised model.

    \b
    Example:
      fedfs export s3://fed-bucket/liver --key keys/A.key -d 501 -o models/liver
      nnUNetv2_predict_from_modelfolder -i imagesTs -o preds -m models/liver -f 0
    """
    from ..ops.export import export_site_model

    setup_logging(quiet)
    fed = open_party(url, key, federation_digest, storage_options)
    if not dataset:
        raise ConfigError("no dataset: give -d, FEDFS_DATASET or dataset in --config")
    folder = export_site_model(fed, fed.identity.name, str(dataset), out_dir, configuration=configuration,
                               fold=fold, trainer=trainer, plans=plans,
                               in_results=out_dir if results_layout else None, require_final=not allow_unfinished)
    click.echo(f"exported {folder}")


@click.command("status", context_settings=CONTEXT)
@readonly_options
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
@click.option("--all", "all_sites", is_flag=True,
              help="One row per site even past 40 sites (by default only the sites that stand out).")
def status_command(url: str | None, as_json: bool, all_sites: bool, pin: str | None,
                   storage_options: tuple[str, ...]) -> None:
    """Show where the federation at URL stands: one row per site, the current global.

    Read-only and needs no key: every file is verified against federation.json.
    Per site: phase, last heartbeat, the global it last trained from, staleness,
    last metrics and files rejected with the reason; then who contributed to the
    current global. Files that do not verify are listed, never fatal. Past 40
    sites: counts by phase, then only the sites that stand out (silent, rejected
    files, stalest, worst Dice or loss, slowest), each with the reason; --all
    lists every site.

    \b
    Example:
      fedfs status s3://fed-bucket/liver --federation-digest 3f1c...
      fedfs status /mnt/share/fed --json | jq '.sites.HospitalA.phase'
    """
    from ..ops.status import collect_status, render_status

    d = collect_status(open_readonly(url, pin, storage_options))
    if as_json:
        click.echo(json.dumps(d, indent=2, sort_keys=False))
        return
    from rich.console import Console

    Console(width=None if sys.stdout.isatty() else 160).print(render_status(d, all_sites=all_sites))


@click.command("report", context_settings=CONTEXT)
@readonly_options
@click.option("-o", "--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="HTML file to write (one self-contained page).")
def report_command(url: str | None, out_path: str, pin: str | None, storage_options: tuple[str, ...]) -> None:
    """Write one self-contained HTML report of the federation at URL.

    Built only from verified bucket files, no key needed: training loss and
    validation pseudo-Dice per site and round, staleness of each update,
    round durations, the merged fingerprint and plans, and which layers
    AsymFedAvg shares. Plots are embedded images; the page loads nothing from
    the network, so it can be mailed or opened offline.

    \b
    Example:
      fedfs report s3://fed-bucket/liver -o liver-report.html
    """
    from ..ops.report import build_report

    path = build_report(open_readonly(url, pin, storage_options), out_path)
    click.echo(f"wrote {path}")


@click.group("bundle", context_settings=CONTEXT)
def bundle_group() -> None:
    """Air-gap bundles: move the files one step needs through removable media.

    For a site with no access to the bucket: the coordinator exports what the
    site needs, the site imports it into a private folder and runs its steps
    there, exports what it produced, and the coordinator imports that into the
    bucket. Bundles are signed; import verifies every file before writing any.

    \b
    Example (coordinator, then the offline site, then the coordinator):
      fedfs bundle export s3://fed/liver --for C --key keys/coord.key -o to-C.tar
      fedfs bundle import to-C.tar /data/fedfs-C --federation-digest 3f1c...
      fedfs site step /data/fedfs-C --key keys/C.key -d 503
      fedfs bundle export /data/fedfs-C --from C --key keys/C.key -o from-C.tar
      fedfs bundle import from-C.tar s3://fed/liver
    """


@bundle_group.command("export", context_settings=CONTEXT)
@optional_url
@click.option("--for", "for_site", metavar="SITE", help="Export what SITE needs for its next step.")
@click.option("--from", "from_site", metavar="SITE", help="Export what SITE produced that the aggregator has not seen.")
@click.option("-o", "--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Bundle file to write (tar).")
@opt("--key", "key", type=click.Path(dir_okay=False),
     help="Private key of the exporting party; it signs the bundle.")
@click.option("--all", "everything", is_flag=True, help="With --from: every file of SITE, not only the new ones.")
@pin_storage_config
def bundle_export(url: str | None, for_site: str | None, from_site: str | None, out_path: str, key: str | None,
                  everything: bool, pin: str | None, storage_options: tuple[str, ...]) -> None:
    """Write a signed bundle of the files a site needs (--for) or produced (--from).

    \b
    Example:
      fedfs bundle export s3://fed/liver --for C --key keys/coord.key -o /media/usb/to-C.tar
      fedfs bundle export /data/fedfs-C --from C --key keys/C.key -o /media/usb/from-C.tar
    """
    from ..ops.bundle import export_bundle

    if not key:
        raise ConfigError("exporting a bundle needs this party's private key (--key or FEDFS_KEY): it signs the bundle")
    fed = open_readonly(url, pin, storage_options).as_party(key)
    click.echo(str(export_bundle(fed, out_path, for_site=for_site, from_site=from_site, everything=everything)))


@bundle_group.command("import", context_settings=CONTEXT)
@click.argument("bundle", type=click.Path(dir_okay=False, exists=True))
@optional_url
@pin_storage_config
def bundle_import(bundle: str, url: str | None, pin: str | None, storage_options: tuple[str, ...]) -> None:
    """Verify a bundle and publish its files into the bucket at URL (all or nothing).

    Checks the bundle's signature, every file's sha256, and every document's
    signature and role for its location before writing anything; files already
    there must be identical. Into an empty folder (an offline site's first
    import) give --federation-digest to trust the bundle's federation.json.

    \b
    Example:
      fedfs bundle import /media/usb/from-C.tar s3://fed/liver
      fedfs bundle import /media/usb/to-C.tar /data/fedfs-C --federation-digest 3f1c...
    """
    from ..ops.bundle import import_bundle

    if not url:
        raise ConfigError("no bucket URL: give it as an argument, in FEDFS_URL or as url in --config")
    click.echo(str(import_bundle(bundle, url, pin=pin, storage_options=storage_options_of(storage_options))))


@click.command("synth", context_settings=CONTEXT)
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for OUT/nnUNet_raw (the datasets) and OUT/heldout (test cases, outside the raw data).")
@click.option("--sites", "n_sites", type=click.IntRange(1, 26), default=2, show_default=True,
              help="How many sites' datasets to write, each with its own scanner style.")
@click.option("--base-id", type=click.IntRange(1, 999), default=501, show_default=True,
              help="nnU-Net dataset id of the first site; the others count up from it.")
@click.option("--names", default=None, help="Comma-separated dataset names (default SiteA,SiteB,...).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace datasets of the same ids already in OUT/nnUNet_raw.")
def synth(out_dir: str, n_sites: int, base_id: int, names: str | None, seed: int, overwrite: bool) -> None:
    """Write tiny synthetic 2D nnU-Net raw datasets, one per site, to try fedfs out.

    Each site gets a raw dataset (imagesTr, labelsTr, dataset.json with the
    same channel and label names at every site) and held-out cases for
    nnUNetv2_predict; sites differ in intensities, spacing and artefacts.

    \b
    Example:
      fedfs synth -o /tmp/try --sites 2 --base-id 501
      export nnUNet_raw=/tmp/try/nnUNet_raw
    """
    from ..testing.synthetic import make_federation

    out = Path(out_dir)
    raw = out / "nnUNet_raw"
    chosen = [n.strip() for n in names.split(",")] if names else None
    if chosen is not None and len(chosen) != n_sites:
        raise ConfigError(f"--names gives {len(chosen)} names for --sites {n_sites}")
    if base_id + n_sites - 1 > 999:
        raise ConfigError(f"--base-id {base_id} with {n_sites} sites passes nnU-Net's largest id, 999")
    taken = sorted(p.name for i in range(base_id, base_id + n_sites) for p in raw.glob(f"Dataset{i:03d}_*"))
    if taken and not overwrite:
        raise ConfigError(f"{raw}: already holds {', '.join(taken)}; pass --overwrite to replace them "
                          "or pick another --base-id")
    for name in taken:  # another name under the same id would make nnU-Net's -d ambiguous
        shutil.rmtree(raw / name)
    try:
        sites = make_federation(raw, n_sites=n_sites, base_id=base_id, seed=seed, names=chosen,
                                test_root=out / "heldout")
    except ValueError as exc:
        raise ConfigError(f"--names: {exc}") from None
    for s in sites:
        click.echo(f"{s.dataset_name}: -d {s.dataset_id}, {s.n_train} training cases in {s.dataset_dir}; "
                   f"{s.n_test} held-out in {s.images_ts} (labels {s.labels_ts})")
    click.echo(f"export nnUNet_raw={raw}")
