"""A tiny plain-PyTorch :class:`~fedfs.roles.site.LocalWork`, for tests, examples and benchmarks.

Each site "trains" a small convolutional model towards a site-specific target
by a few steps of SGD on synthetic data. It needs no nnU-Net and runs in
milliseconds, so the protocol (rounds, barriers, staleness, crashes) can be
exercised end to end. ``depth`` changes the architecture, for AsymFedAvg; ``labels``
and ``cases`` may be changed between steps, as a site's engineer edits a dataset.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..fl.plans import plans_digest


class ToyWork:
    """A site's local work on a toy model; deterministic given ``seed``."""

    def __init__(self, name: str, cases: int = 4, seed: int = 0, depth: int = 2, width: int = 8,
                 lr: float = 0.1, steps: int = 5, delay_s: float = 0.0, labels: dict[str, int] | None = None) -> None:
        self.name, self.cases, self.seed, self.depth, self.width = name, cases, seed, depth, width
        self.labels = dict(labels) if labels is not None else {"background": 0, "foreground": 1}
        self.lr, self.steps, self.delay_s = lr, steps, delay_s
        self.model = None
        self.epoch = 0
        self.total_epochs = 0
        self.trained_rounds = 0

    @property
    def num_cases(self) -> int:
        return self.cases

    def census(self) -> tuple[int, int]:
        return self.cases, 1

    def census_names(self) -> dict[str, Any]:
        """What a dataset.json says: label names and channel names (the census carries both)."""
        return {"labels": dict(self.labels), "channel_names": {"0": "toy"}}

    def fingerprint_summary(self, total_cases: int) -> dict[str, Any]:
        from ..fl.fingerprint import SiteSummaryBuilder, summarize_samples

        rng = np.random.default_rng(self.seed)
        spc = int(1000 // total_cases)
        b = SiteSummaryBuilder(1, total_cases, spc)
        for _ in range(self.cases):
            samples = np.round(rng.normal(100 + self.seed, 10, spc)).astype(np.float32)
            b.add_case([1.0, 1.0], [64, 64], 1.0, [summarize_samples(samples)], "float32")
        return b.summary()

    def plan(self, global_fingerprint: dict[str, Any] | None) -> tuple[str, dict[str, Any], str]:
        plans = {"plans_name": "ToyPlans", "depth": self.depth, "width": self.width,
                 "fingerprint_cases": len(global_fingerprint["spacings"]) if global_fingerprint else self.cases}
        digest = plans_digest(plans)
        return "ToyPlans", {"plans": plans}, digest

    def _build(self):
        import torch

        torch.manual_seed(self.seed)
        layers = [torch.nn.Conv2d(1, self.width, 3, padding=1)]
        for _ in range(self.depth - 1):
            layers += [torch.nn.ReLU(), torch.nn.Conv2d(self.width, self.width, 3, padding=1)]
        layers += [torch.nn.ReLU(), torch.nn.Conv2d(self.width, 2, 1)]
        return torch.nn.Sequential(*layers)

    def start(self, total_epochs: int) -> None:
        self.total_epochs = total_epochs
        if self.model is None:
            self.model = self._build()

    def initial_weights(self, path: str) -> None:
        from ..weights.tensors import save_weights

        save_weights(path, self.model, {"site": self.name, "init": "1"})

    def _load(self, path: str) -> None:
        from ..weights.tensors import load_weights

        tensors, _ = load_weights(path)
        own = dict(self.model.named_parameters())
        import torch

        with torch.no_grad():
            for k, t in tensors.items():
                if k in own and own[k].shape == t.shape:
                    own[k].copy_(t)

    def train_round(self, global_path: str, epochs: int, update_path: str) -> dict[str, float]:
        import time

        import torch

        from ..weights.tensors import save_weights

        self._load(global_path)
        if self.delay_s:
            time.sleep(self.delay_s)
        g = torch.Generator().manual_seed(self.seed * 1000 + self.trained_rounds)
        opt = torch.optim.SGD(self.model.parameters(), lr=self.lr)
        loss = torch.tensor(0.0)
        for _ in range(epochs * self.steps):
            x = torch.randn(2, 1, 16, 16, generator=g)
            y = (x > 0.1 * self.seed).long()[:, 0]
            loss = torch.nn.functional.cross_entropy(self.model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.epoch += epochs
        self.trained_rounds += 1
        save_weights(update_path, self.model, {"site": self.name})
        return {"train_loss": float(loss.detach()), "epoch": float(self.epoch)}

    def checkpoint(self) -> None:
        pass

    def finish(self, global_path: str) -> dict[str, Any]:
        self._load(global_path)
        return {"epochs": self.epoch}


def toy_federation(root: Any, names: str | list[str] = "AB", *, work: type = ToyWork, cases: int = 2,
                   **settings: Any) -> tuple[Any, Any, dict[str, Any]]:
    """A fresh federation of toy sites on a folder under ``root`` (keys in ``root/keys``):
    returns (federation, its aggregator, {site name: site}); ``settings`` go to the config."""
    from pathlib import Path

    from ..federation import Federation, config_from_key_dir
    from ..roles.aggregator import Aggregator
    from ..roles.site import Site
    from ..trust.signing import generate_keypair

    root, names = Path(root), list(names)
    keys = root / "keys"
    generate_keypair("agg", "aggregator", keys)
    for s in names:
        generate_keypair(s, "site", keys)
    config, agg = config_from_key_dir(keys, names, **settings)
    fed, _ = Federation.create(str(root / "bucket"), config, agg)
    aggregator = Aggregator(fed.as_party(keys / "agg.key"), root / "agg")
    sites = {s: Site(fed.as_party(keys / f"{s}.key"), work(s, cases=cases, seed=i), root / s)
             for i, s in enumerate(names)}
    return fed, aggregator, sites


def step_all(aggregator: Any, sites: dict[str, Any], times: int = 1, *, skip: Any = (),
             on_step: Any = None) -> list[Any]:
    """Round-robin, ``times`` times: the aggregator steps, then each site not in ``skip`` (looked up by
    name at its turn, so ``on_step(name, result)`` may replace a site, as a restart does). Returns the
    aggregator's step results."""
    out = []
    for _ in range(times):
        out.append(aggregator.step())
        for name in list(sites):
            if name not in skip:
                result = sites[name].step()
                if on_step is not None:
                    on_step(name, result)
    return out


def drive(aggregator: Any, sites: dict[str, Any], max_steps: int = 60, *, skip: Any = (),
          on_step: Any = None) -> list[Any]:
    """:func:`step_all` until every site not in ``skip`` has finished; AssertionError after ``max_steps``."""
    out: list[Any] = []
    for _ in range(max_steps):
        if all(s.state.finished for n, s in sites.items() if n not in skip):
            return out
        out += step_all(aggregator, sites, skip=skip, on_step=on_step)
    raise AssertionError("the federation did not finish")
