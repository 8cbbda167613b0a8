"""One party of a toy federation as its own process: for tests, benchmarks and examples.

A federation of a toy PyTorch model (:class:`fedfs.testing.toy.ToyWork`): the real
site and aggregator roles, the real bucket and triggers, no nnU-Net, so a
whole federation runs in seconds and each party can be killed like a real one::

    python -m fedfs.testing.toy_party site URL --key keys/A.key --workdir w/A [--cases 4 --seed 1 --delay-s 0
                                       --poll-interval 0.5 --watch auto|poll|inotify]
    python -m fedfs.testing.toy_party aggregator URL --key keys/agg.key --workdir w/agg [--poll-interval 0.5]

Both run the roles' one loop, ``run_loop(role.step, make_trigger(...))``
(:mod:`fedfs.roles.loop`), until the role is done and exit 0; a blocked role keeps
polling, as a daemon does. Storage options come from ``FEDFS_STORAGE_OPTIONS`` (JSON), as for the
``fedfs`` CLI. Crash points: ``FEDFS_FAULTS`` (see :mod:`fedfs.roles.faults`).

``FEDFS_TOY_CLOCK_OFFSET_S`` (seconds, may be negative) shifts this party's
wall clock as fedfs sees it (``time.time`` and the ``signed_at`` of every
document it signs) to simulate a machine whose clock is wrong where
libfaketime is not installed. Only this entry point honours it; it does not
change the kernel clock, so libraries that read the clock another way (for
example botocore's request signing) are unaffected; ``faketime`` shifts those too.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time


def _shift_clock(offset_s: float) -> None:
    """Make fedfs (and anything calling ``time.time``) see a clock ``offset_s`` seconds off.

    Protocol stamps come from ``time.time`` (:func:`fedfs.protocol.timestamps.utcnow`), so they shift too."""
    real_time = time.time
    time.time = lambda: real_time() + offset_s  # type: ignore[assignment]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fedfs.testing.toy_party", description=__doc__.split("\n\n")[0])
    p.add_argument("role", choices=["site", "aggregator"])
    p.add_argument("url", help="bucket URL (folder, s3://, smb://)")
    p.add_argument("--key", required=True, help="the party's private key (NAME.key)")
    p.add_argument("--workdir", required=True, help="the party's local working folder")
    p.add_argument("--cases", type=int, default=4, help="site: training cases (the FedAvg weight)")
    p.add_argument("--seed", type=int, default=1, help="site: seed of its data and model")
    p.add_argument("--depth", type=int, default=2, help="site: convolution layers (differs for AsymFedAvg)")
    p.add_argument("--delay-s", type=float, default=0.0, help="site: sleep this long inside each round's training")
    p.add_argument("--poll-interval", type=float, default=0.5, help="seconds between polls")
    p.add_argument("--watch", choices=["auto", "poll", "inotify"], default="auto")
    p.add_argument("--max-idle-s", type=float, default=None, help="give up after this long with nothing to do")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {args.role} %(levelname)s %(name)s: %(message)s")
    offset = os.environ.get("FEDFS_TOY_CLOCK_OFFSET_S")
    if offset:
        _shift_clock(float(offset))  # before the roles are imported: they bind time.time / utcnow

    from ..store.options import parse_storage_options
    from ..errors import FedfsError, exit_code_for
    from ..federation import Federation
    from ..roles.loop import run_loop
    from ..store.watch import make_trigger

    try:
        torch_threads = int(os.environ.get("FEDFS_TORCH_THREADS", "1"))
        import torch

        torch.set_num_threads(torch_threads)
        fed = Federation.open(args.url, storage_options=parse_storage_options(), identity=args.key)
        if args.role == "site":
            from ..roles.site import Site
            from .toy import ToyWork

            work = ToyWork(fed.identity.name, cases=args.cases, seed=args.seed, depth=args.depth,
                           delay_s=args.delay_s)
            role = Site(fed, work, args.workdir)
        else:
            from ..roles.aggregator import Aggregator

            role = Aggregator(fed, args.workdir)
        trigger = make_trigger(fed.store, watch=args.watch, poll_interval=args.poll_interval)
        last = {"line": None}

        def on_result(result: object) -> None:
            if str(result) != last["line"]:
                logging.getLogger(f"fedfs.testing.toy_party.{args.role}").info("%s", result)
                last["line"] = str(result)

        try:
            result = run_loop(role.step, trigger, on_result=on_result, max_idle_s=args.max_idle_s)
        finally:
            trigger.close()
        print(str(result), flush=True)
        return 0
    except FedfsError as exc:
        print(f"fedfs: error: {exc}", file=sys.stderr, flush=True)
        return exit_code_for(exc)


if __name__ == "__main__":
    sys.exit(main())
