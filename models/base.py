"""The one interface of the ready models: an :class:`Experiment` per data set and task, and the
command line every ``models/*.py`` script shares.

An experiment knows how to load its data (train, validation and test units, with the paper's
protocol), which EFA and EFE configurations and fit options are recommended (chosen on the
validation units), its metric and the paper's numbers::

    from pyro_efa import fit, evaluate
    from pyro_efa.models import get

    exp = get("movielens_items")
    train, val, test = splits = exp.load()                 # ../shared/data or $PYRO_EFA_DATA
    model = exp.model("efa", "uni", splits)                # an EFA (or "efe" for the baseline)
    fitted = fit(model, train, val_data=val, options=exp.fit_options("efa", "uni"))
    evaluate(fitted, test)[exp.metric]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyro
import torch

from pyro_efa import EFA, FAMILIES, EFAConfig, EFAData, FitOptions, evaluate, fit
from pyro_efa.families import resolve_per_key

__all__ = [
    "DATA_DIR",
    "Experiment",
    "Splits",
    "baseline_record",
    "changed_options",
    "data_dir",
    "describe",
    "parser",
    "run_cli",
    "smoke_splits",
]

#: train, validation and test units of an experiment
Splits = tuple[EFAData, EFAData, EFAData]

#: where the data sets are read from: ``$PYRO_EFA_DATA``, else ``shared/data`` beside the checkout
DATA_DIR = Path(os.environ.get("PYRO_EFA_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

SMOKE_SIZES = (32, 16, 16)  # train, validation, test units under --smoke
SMOKE_MODEL = {"dim": 8, "num_layers": 1, "num_heads": 1, "head_dim": 8}


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """``path``, or :data:`DATA_DIR`."""
    return Path(path) if path is not None else DATA_DIR


def smoke_splits(splits: Splits, sizes: Sequence[int] = SMOKE_SIZES) -> Splits:
    """The first few units of each split (a data set of its own): seconds-long pipeline checks."""
    out = tuple(d.subset(range(min(n, len(d))), reindex=True) for d, n in zip(splits, sizes, strict=True))
    return out  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One experiment of the paper: data, recommended models and fit options, metric, targets.

    :ivar str name: e.g. ``"movielens_items"``.
    :ivar str metric: the key of :func:`pyro_efa.evaluate` the paper reports.
    :ivar tuple directions: the directions the paper runs (``("bi",)`` for temperatures).
    :ivar dict paper: the paper's numbers, ``(model, direction) -> metric``.
    :ivar loader: ``loader(data_dir) -> (train, val, test)``.
    :ivar dict efa: EFA options per direction (fields of :class:`~pyro_efa.EFAConfig`).
    :ivar dict efe: EFE options per direction (applied on top of :meth:`EFAConfig.efe`).
    :ivar dict fit: fit options per ``(model, direction)``; ``(model, None)`` for both directions.
    :ivar str kind: ``"valued"`` or ``"items"`` (item sequences).
    :ivar bool max_len_from_splits: size the position embedding to the longest unit of all
        splits (item sequences, where the test units may be longer than any training unit).
    :ivar baselines: ``baselines(splits, data_dir) -> records`` (see :func:`baseline_record`):
        the simple models a user would try first, on the same splits and metric, their
        hyperparameters chosen on the validation units; ``None`` for none.
    """

    name: str
    metric: str
    directions: tuple[str, ...]
    paper: Mapping[tuple[str, str], float]
    loader: Callable[[Path], Splits]
    efa: Mapping[str, Mapping[str, Any]]
    efe: Mapping[str, Mapping[str, Any]]
    fit: Mapping[tuple[str, str | None], Mapping[str, Any]]
    kind: str = "valued"
    max_len_from_splits: bool = False
    baselines: Callable[[Splits, Path], list[dict[str, Any]]] | None = None

    def load(self, path: str | os.PathLike | None = None) -> Splits:
        """Train, validation and test units (read from ``path``, default :data:`DATA_DIR`)."""
        return self.loader(data_dir(path))

    def config(self, model: str, direction: str, **overrides: Any) -> EFAConfig:
        """The recommended configuration of ``model`` (``"efa"`` or ``"efe"``) and ``direction``,
        with ``overrides`` (fields of :class:`~pyro_efa.EFAConfig`) on top. Families with a
        nuisance parameter share it across keys (``per_key=False`` unless ``family_options``
        says otherwise), as the paper's models do, rather than the library's ``"auto"``."""
        _check(model, direction, self.directions)
        if model == "efa":
            config = EFAConfig(direction=direction, **{**self.efa[direction], **overrides})
        else:
            base = EFAConfig.efe(self.kind, direction=direction)
            config = base.replace(**{**self.efe.get(direction, {}), **overrides})
        return _shared_nuisance(config) if self.kind == "valued" else config  # items: categorical only

    def model(self, model: str, direction: str, splits: Splits, **overrides: Any) -> EFA:
        """The recommended model, sized for the training units ``splits[0]``."""
        config = self.config(model, direction, **overrides)
        if self.max_len_from_splits and model == "efa" and config.max_len is None:
            config = config.replace(max_len=max(d.max_len for d in splits))
        return EFA.from_data(splits[0], config)

    def fit_options(self, model: str, direction: str, **overrides: Any) -> FitOptions:
        """The recommended :class:`~pyro_efa.FitOptions` of ``model`` and ``direction``."""
        _check(model, direction, self.directions)
        options = self.fit.get((model, direction), self.fit.get((model, None), {}))
        return FitOptions(**{**options, **overrides})


def baseline_record(
    experiment: str,
    direction: str,
    model: str,
    metric: str,
    val: float,
    test: float,
    architecture: str,
    options: Mapping[str, Any],
    seconds: float,
    seed: int = 0,
) -> dict[str, Any]:
    """One baseline's result in the form of a fit's (``benchmarks/reproduce.py`` tables both).

    :param str model: the baseline's name (the table's model column), e.g. ``"ridge"``.
    :param float val: its metric on the validation units (where its options were chosen).
    :param float test: its metric on the test units.
    :param str architecture: a short description, with the options chosen.
    :param seed: the seed of a baseline with randomness (0 for deterministic ones).
    """
    return {
        "experiment": experiment, "model": model, "direction": direction, "seed": seed, "guide": "-",
        "metric": metric, "architecture": architecture, "recommended": True, "val": float(val),
        "test": float(test), "epochs": 0, "best_epoch": None, "seconds": float(seconds),
        "options": dict(options),
    }  # fmt: skip


def describe(efa: EFA) -> str:
    """A short description of an EFA configuration for the results tables: layers, heads and
    width, the attention stream (the paper's or not), LayerNorm, feed-forward, dropout, prior
    scale; for an EFE its keys and token."""
    c = efa.config.to_dict()
    no_repeat = ", no repeats (exclude_context_items)" if c.get("exclude_context_items") else ""
    if c["attention"] == "uniform":
        extra = []
        if c["kind"] == "valued" and c["key_embedding"] == "mlp":
            extra.append("coordinate keys (MLP)")
        if c["value_embedding"] == "key_linear_std":
            extra.append("token on standardised x")
        return ", ".join([f"EFE d={c['dim']}", *extra]) + no_repeat
    if c["direction"] == "uni":
        stream = "causal, one pass (= paper)"
    elif c["context_stream"] == "fixed":
        stream = "fixed context, one pass (not the paper's)"
    else:
        stream = "shared context, per target (paper's)"
        if c["target_fraction"] < 1:
            stream += f", {c['target_fraction']:g} of targets per step"
    extra = []
    if c["layer_norm"]:
        extra.append("LN")
    if c["ff_dim"]:
        extra.append(f"FF{c['ff_dim']}")
    if c["dropout"]:
        extra.append(f"drop {c['dropout']:g}")
    if c["prior_scale"] != 1.0:
        extra.append(f"s={c['prior_scale']:g}")
    head = f"{c['num_layers']}Lx{c['num_heads']}H d={c['dim']}"
    return ", ".join([head, stream, *extra]) + no_repeat


def changed_options(options: FitOptions) -> dict[str, Any]:
    """The fit options that differ from :class:`~pyro_efa.FitOptions`' defaults (but the number
    of epochs and the seed): what the results tables print of a fit."""
    default = FitOptions()
    skip = ("num_epochs", "seed")
    return {k: v for k, v in options.to_dict().items() if k not in skip and v != getattr(default, k)}


def _check(model: str, direction: str, directions: Sequence[str]) -> None:
    if model not in ("efa", "efe"):
        raise ValueError(f"model must be 'efa' or 'efe', got {model!r}")
    if direction not in directions:
        raise ValueError(f"this experiment runs direction(s) {list(directions)}, got {direction!r}")


def _shared_nuisance(config: EFAConfig) -> EFAConfig:
    """``config`` with ``per_key=False`` for each of its families whose ``per_key`` would be
    ``"auto"`` (not given, and ``"auto"`` by default): the paper's experiments keep one nuisance
    parameter (Gaussian scale, ...) shared by all keys, as every family did before ``"auto"``,
    so that their reproduced numbers do not move. Pinned here, for every experiment."""
    options = {k: dict(v) for k, v in config.family_options.items()}
    for name in config.families_used:
        given = options.get(name, {}).get("per_key")
        # not None exactly when the effective value is "auto" (no counts: it would resolve to False)
        if name in FAMILIES and resolve_per_key(FAMILIES[name], given, torch.zeros(0)) is not None:
            options.setdefault(name, {})["per_key"] = False
    return config if options == config.family_options else config.replace(family_options=options)


# ------------------------------------------------------------------------------------------------
# the command line of every models/*.py script
def _summary(name: str, scores: list[float], paper: float | None, digits: int) -> str:
    mean = statistics.fmean(scores)
    sd = statistics.stdev(scores) if len(scores) > 1 else math.nan
    ref = f"{paper:>8.{digits}f}" if paper is not None else f"{'-':>8}"
    runs = " ".join(f"{s:.{digits}f}" for s in scores)
    return f"{name:<22} {mean:>8.{digits}f} {sd:>7.{digits}f} {ref}   {runs}"


def parser(description: str, experiments: Sequence[str]) -> argparse.ArgumentParser:
    """The arguments every script takes; ``--task`` picks one of ``experiments``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data-dir", type=Path, default=DATA_DIR, help="folder of the paper's data sets")
    if len(experiments) > 1:
        p.add_argument("--task", choices=experiments, default=experiments[0])
    p.add_argument("--direction", nargs="+", choices=("uni", "bi"), help="default: the experiment's")
    p.add_argument("--guide", default="map", help="a guide name (map, normal, lowrank, ...)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="fit seeds")
    p.add_argument("--max-epochs", type=int, default=100, help="early stopping may end sooner")
    p.add_argument("--smoke", action="store_true", help="tiny data and model, 1 epoch")
    return p


def run_cli(
    experiment: Experiment,
    args: argparse.Namespace,
    variants: Sequence[tuple[str, str, dict[str, Any], float | None]] | None = None,
    digits: int = 4,
) -> None:
    """Fit and evaluate EFA and EFE over seeds, one line per model and direction.

    :param variants: ``(label, model, overrides, paper)`` rows to run per direction (default:
        EFA and EFE with the recommended options, beside the paper's numbers).
    """
    splits = experiment.load(args.data_dir)
    overrides, max_epochs = {}, args.max_epochs
    if args.smoke:
        splits, overrides, max_epochs = smoke_splits(splits), dict(SMOKE_MODEL), 1
    train, val, test = splits
    print(f"{experiment.name}: train {train}\n  validation {val}\n  test {test}")
    print(f"test {experiment.metric} over seeds {args.seeds}, guide {args.guide}")
    print(f"{'model':<22} {'mean':>8} {'sd':>7} {'paper':>8}   per seed")
    for direction in args.direction or experiment.directions:
        default = [(m.upper(), m, {}, experiment.paper.get((m, direction))) for m in ("efa", "efe")]
        for label, which, extra, paper in variants or default:
            small = {k: v for k, v in overrides.items() if which == "efa" or k == "dim"}
            scores = []
            for seed in args.seeds:
                pyro.set_rng_seed(seed)  # network initialisation (fit draws it again from seed)
                model = experiment.model(which, direction, splits, **{**small, **extra})
                options = experiment.fit_options(which, direction, num_epochs=max_epochs, seed=seed)
                progress = not args.smoke
                fitted = fit(model, train, guide=args.guide, val_data=val, options=options, progress=progress)
                scores.append(evaluate(fitted, test)[experiment.metric])
            print(_summary(f"{label} {direction}", scores, paper, digits), flush=True)
