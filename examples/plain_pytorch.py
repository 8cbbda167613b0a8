"""Federate a small PyTorch model (no nnU-Net) over a folder bucket, from Python.

Three sites, each with its own data, train a tiny classifier; an aggregator
averages them (FedAvg weighted by cases). Every party is a thread here, but each
uses only the bucket, its own key and its own work folder, exactly as separate
machines would.

    python examples/plain_pytorch.py [/tmp/fedfs-plain]
"""

from __future__ import annotations

import sys
import tempfile
import threading
from pathlib import Path

import torch

from fedfs import Aggregator, Federation, SiteClient, config_from_key_dir, generate_keypair, run_loop
from fedfs.store.watch import Trigger

ROUNDS = 4
SITES = {"A": (200, 0.0), "B": (120, 0.5), "C": (60, -0.5)}  # cases, feature shift


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def data(n: int, shift: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g) + shift
    y = ((x[:, 0] - shift) * (x[:, 1] - shift) > 0).long()  # the same rule everywhere
    return x, y


def site(fed: Federation, name: str, workdir: Path, log: list) -> None:
    n, shift = SITES[name]
    x, y = data(n, shift, seed=ord(name))
    model = make_model()
    client = SiteClient(fed, workdir)
    client.join(model, num_cases=n, description="2-16-2 MLP")
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(ROUNDS):
        version = client.pull(model, timeout=120, poll_interval=0.1)
        for _ in range(50):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        client.push(model, num_cases=n, metrics={"train_loss": float(loss.detach())})
        log.append(f"site {name}: trained from v{version}, loss {float(loss):.3f}")
    client.pull(model, final=True, timeout=120, poll_interval=0.1)
    acc = float((model(x).argmax(1) == y).float().mean())
    log.append(f"site {name}: final global accuracy on local data {acc:.2f}")


def main(root: Path) -> None:
    keys = root / "keys"
    generate_keypair("coordinator", "aggregator", keys)
    for s in SITES:
        generate_keypair(s, "site", keys)
    config, agg_key = config_from_key_dir(keys, list(SITES), mode="fedavg", rounds=ROUNDS)
    url = str(root / "bucket")
    Federation.create(url, config, agg_key)
    log: list[str] = []
    threads = [threading.Thread(target=site, args=(Federation.open(url, identity=keys / f"{s}.key"), s,
                                                   root / f"site-{s}", log)) for s in SITES]
    for t in threads:
        t.start()
    aggregator = Aggregator(Federation.open(url, identity=keys / "coordinator.key"), root / "aggregator")
    result = run_loop(aggregator.step, Trigger(0.1), max_idle_s=120,
                      on_result=lambda r: log.append(f"aggregator: {r}") if r.action != "wait" else None)
    for t in threads:
        t.join()
    print("\n".join(log))
    print(f"done: {result}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="fedfs-plain-")))
