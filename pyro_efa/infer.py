"""Fitting EFA with SVI: guides, the training loop, checkpoints.

:func:`fit` runs stochastic variational inference with an autoguide over the latent embedding
sites (``"map"``: :class:`~pyro.infer.autoguide.AutoDelta`, i.e. MAP in constrained space;
``"normal"``: :class:`~pyro.infer.autoguide.AutoNormal`; ``"lowrank"``:
:class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal`). Network weights are point
estimates. Training stops early on the validation negative log-likelihood and restores the best
state. Everything is seeded.

The model may be an :class:`~pyro_efa.EFA` or any :class:`~pyro.nn.PyroModule` that holds one
and is called as ``model(data, sample=False)`` (a larger model composing EFA).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import itertools
import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import (
    AutoDelta,
    AutoGuide,
    AutoLowRankMultivariateNormal,
    AutoNormal,
    init_to_median,
)
from pyro.poutine.messenger import Messenger
from tqdm import tqdm

from . import distributed
from .data import EFAData
from .model import EFA
from .predictive import (
    _index_batches,
    _observed_sites,
    _plugin_loglik,
    _plugin_params,
    _site_mask,
    _trace_batch,
    _unmask,
)

__all__ = ["EFAFit", "find_efa", "fit", "load_checkpoint", "make_guide"]

logger = logging.getLogger(__name__)

GUIDES = ("map", "normal", "lowrank")


def find_efa(model: torch.nn.Module) -> EFA:
    """The :class:`EFA` inside ``model`` (``model`` itself if it is one)."""
    for module in model.modules():
        if isinstance(module, EFA):
            return module
    raise TypeError(f"{type(model).__name__} holds no EFA module")


def _init_loc_fn(radius: float) -> Callable[[dict], torch.Tensor]:
    # Embedding tables start small: uniform(-radius, radius) (N(0, 1) draws from the prior train
    # much worse); other latent sites start at their prior median.
    def init(site: dict) -> torch.Tensor:
        if site["name"].split(".")[-1] in ("alpha", "rho"):
            shape, mean = site["fn"].shape(), site["fn"].mean
            # drawn in float64 on the CPU generator whatever the dtype and device, so that a fit
            # starts the same way in float32 and float64, on the CPU and on a GPU
            init = torch.empty(shape, dtype=torch.float64).uniform_(-radius, radius)
            return init.to(device=mean.device, dtype=mean.dtype)
        return init_to_median(site)

    return init


def make_guide(
    model: torch.nn.Module,
    guide: str = "map",
    *,
    rank: int = 8,
    init_scale: float = 0.01,
    init_radius: float = 0.05,
) -> AutoGuide:
    """An autoguide over the latent sites of ``model``.

    :param str guide: ``"map"``, ``"normal"`` or ``"lowrank"``.
    :param int rank: rank of the low-rank covariance.
    :param float init_scale: initial posterior standard deviation (variational guides).
    :param float init_radius: embeddings start uniform in ``(-init_radius, init_radius)``.
    """
    efa = find_efa(model)
    init = _init_loc_fn(init_radius)
    if guide == "map":
        return AutoDelta(model, init_loc_fn=init, create_plates=efa.create_plates)
    if guide == "normal":
        return AutoNormal(model, init_loc_fn=init, init_scale=init_scale, create_plates=efa.create_plates)
    if guide == "lowrank":
        return AutoLowRankMultivariateNormal(model, init_loc_fn=init, init_scale=init_scale, rank=rank)
    raise ValueError(f"guide must be one of {GUIDES}, got {guide!r}")


@dataclasses.dataclass
class EFAFit:
    """A fitted model with its guide and training history.

    :ivar model: the model (an :class:`EFA` or a larger model holding one).
    :ivar guide: the fitted autoguide.
    :ivar str guide_type: ``"map"``, ``"normal"`` or ``"lowrank"``.
    :ivar list losses: mean training loss (negative ELBO per observation) of each epoch.
    :ivar list val_nll: validation NLL per observation after each epoch (empty without
        validation data).
    :ivar int best_epoch: the epoch whose state was restored (1-based; the last without
        validation data).
    :ivar float seconds: wall time of the fit.
    :ivar dict schema: what the data looked like: kind, columns, key and item vocabularies.
    :ivar dict options: the options :func:`fit` was called with.
    """

    model: torch.nn.Module
    guide: AutoGuide
    guide_type: str
    losses: list[float]
    val_nll: list[float]
    best_epoch: int
    seconds: float
    schema: dict[str, Any]
    options: dict[str, Any]

    @property
    def efa(self) -> EFA:
        return find_efa(self.model)

    def median(self, data: EFAData) -> dict[str, torch.Tensor]:
        """Posterior median (MAP for ``"map"``) of every latent site."""
        with torch.no_grad():
            return {k: v.detach() for k, v in self.guide.median(data).items()}

    def evaluate(self, data: EFAData, **kwargs: Any) -> dict[str, float]:
        """Shortcut for :func:`pyro_efa.evaluate`."""
        from .predictive import evaluate

        return evaluate(self, data, **kwargs)

    def save(self, path: str | os.PathLike) -> None:
        """Shortcut for :func:`pyro_efa.save`."""
        from .serialization import save

        save(self, path)


def _schema(data: EFAData) -> dict[str, Any]:
    return {"kind": data.kind, "columns": data.columns, "keys": data.keys, "items": data.items}


# ----------------------------------------------------------------------------------------------
# training
CHECKPOINT_FORMAT = "pyro_efa.checkpoint/1"
CHECKPOINT_NAME = "checkpoint.pt"
# options that change the trajectory of a fit: a checkpoint resumes only under the same values
_RESUME_OPTIONS = (
    "guide", "batch_size", "lr", "seed", "rank", "init_scale", "init_radius", "init_intercept",
    "num_particles", "world_size",
)  # fmt: skip


class _UnitScale(Messenger):
    """Multiplies the scale of every site inside the unit plate ``name`` by ``factor``. Used to
    make a process's share of a global batch count as ``W / B_global`` per unit (see
    :func:`pyro_efa.distributed.shard`). A factor 0 keeps the sites in the autograd graph (zero
    gradients), which DDP needs: every process must produce a gradient for every parameter."""

    def __init__(self, name: str, factor: float) -> None:
        super().__init__()
        self.name = name
        self.factor = factor

    def _process_message(self, msg: Any) -> None:
        if any(frame.name == self.name for frame in msg["cond_indep_stack"]):
            msg["scale"] = msg["scale"] * self.factor


def _param_label(name: str) -> str:
    """A readable name for a parameter of ``Trace_ELBO()(model, guide)``: the latent site for
    guide parameters (``guide.locs.efa.alpha_unconstrained`` -> ``latent site 'efa.alpha' (loc)``),
    the module path for model parameters."""
    part, _, rest = name.partition(".")
    rest = rest.removesuffix("_unconstrained")
    if part == "guide":
        if rest in ("loc", "scale", "cov_factor"):  # a joint (low-rank) guide over every site
            return f"guide parameter '{rest}' (joint over all latent sites)"
        for kind in ("locs", "scales"):
            if rest.startswith(kind + "."):
                return f"latent site '{rest[len(kind) + 1 :]}' (guide {kind})"
        return f"latent site '{rest}' (guide)"
    return f"model parameter '{rest}'"


def _rng_state() -> dict[str, Any]:
    """Every RNG that training may draw from, as tensors, numbers and lists only (loadable with
    ``torch.load(weights_only=True)``)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt), gauss],
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _write_torch(path: Path, obj: Any) -> None:
    """``torch.save`` to a temporary file in the same directory, flushed to disk, then renamed
    over ``path``: a reader (or a crash) sees the old file or the new one, never a mix."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())

    _atomic_write(path, write)


def _load_error(e: Exception) -> str:
    """A one-line reason why ``torch.load(weights_only=True)`` refused a file."""
    text = str(e)
    for line in text.splitlines():
        low = line.lower()
        if "unsupported global" in low or "unsupported operand" in low:
            reason = line.split("error:", 1)[-1].strip().split(" was not an allowed global")[0]
            reason = reason.split(" whose module")[0]
            return (
                f"it holds pickled Python objects, not only tensors ({reason}); they are never "
                "loaded, since loading them could run code"
            )
    if text.startswith("Weights only load failed"):
        return "it holds pickled Python objects that are never loaded, since loading them could run code"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"the file is truncated, damaged or not a torch file: {type(e).__name__}: {first[:200]}"


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint written by :func:`fit` (a directory or the file itself).

    Only tensors, numbers, strings, lists and dicts are read (``torch.load(weights_only=True)``);
    no code is executed, whatever the file holds.

    :raises ValueError: for a missing, truncated, tampered or foreign file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # truncated zip, pickle opcodes that are not allowed, ...
        raise ValueError(
            f"{path} could not be read as a pyro_efa checkpoint ({_load_error(e)}); delete it to start over"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} file")
    needed = {
        "step": int, "epoch": int, "step_in_epoch": int, "epoch_generator": torch.Tensor,
        "state": dict, "optimizer": dict, "rng": list, "total": float, "losses": list,
        "val_nll": list, "best": dict, "options": dict, "config": str,
    }  # fmt: skip
    for key, kind in needed.items():
        if not isinstance(ckpt.get(key), kind):
            raise ValueError(f"{path} is damaged: entry {key!r} is missing or not a {kind.__name__}")
    try:
        ckpt["config"] = json.loads(ckpt["config"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is damaged: its configuration is not valid JSON ({e})") from e
    return ckpt


def _model_device(model: torch.nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def _data_schema_json(data: Any) -> dict[str, Any]:
    return {
        "kind": data.kind,
        "columns": data.columns,
        "keys": data.keys.to_dict(),
        "items": None if data.items is None else data.items.to_dict(),
    }


def _loglik_total(fitted: EFAFit, data: EFAData, batch_size: int, device: torch.device) -> float:
    """Sum of the plug-in log-likelihood of every target of ``data`` (float64 accumulation)."""
    efa = fitted.efa
    total = torch.zeros((), dtype=torch.float64, device=device)
    params = _plugin_params(fitted)
    for _, batch in _index_batches(data, batch_size):
        batch = batch.to(device)
        tr = _trace_batch(fitted.model, batch, params(batch))
        for _, site in _observed_sites(efa, tr):
            lp = _unmask(site["fn"]).log_prob(site["value"])
            total += torch.where(_site_mask(site), lp, torch.zeros_like(lp)).sum(dtype=torch.float64)
    return float(total)


def _validation_nll(
    fitted: EFAFit, val_data: EFAData, batch_size: int, device: torch.device, rank: int, world: int
) -> float:
    if world == 1 and device.type == "cpu":  # the same numbers as evaluate()
        return -float(_plugin_loglik(fitted, val_data, batch_size).sum()) / val_data.num_observations
    part = val_data.subset(torch.arange(rank, len(val_data), world)) if world > 1 else val_data
    local = _loglik_total(fitted, part, batch_size, device) if len(part) else 0.0
    total = distributed.all_reduce_sum(torch.tensor([local], dtype=torch.float64, device=device))
    return -float(total[0]) / val_data.num_observations


def _invalid_values_error(e: ValueError) -> bool:
    # torch.distributions' argument validation of a NaN / inf parameter
    return "found invalid values" in str(e)


def _nonfinite_sites(model: torch.nn.Module, guide: AutoGuide, batch: EFAData) -> list[str]:
    """Sample sites whose log-density is not finite, from a fresh trace (diagnostics only)."""
    try:
        with torch.no_grad():
            guide_tr = poutine.trace(guide).get_trace(batch)
            model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(batch)
    except ValueError as e:
        return [f"(tracing failed: {str(e).splitlines()[0]})"]
    bad = []
    for tr, which in ((model_tr, "model"), (guide_tr, "guide")):
        for name, site in tr.nodes.items():
            if site["type"] != "sample":
                continue
            with torch.no_grad():
                lp = site["fn"].log_prob(site["value"])
            if not torch.isfinite(lp).all():
                bad.append(f"{which} site '{name}'")
    return bad


class _NonFinite(FloatingPointError):
    """A non-finite loss or gradient (a :class:`FloatingPointError`)."""


def fit(
    model: torch.nn.Module,
    data: EFAData,
    *,
    guide: str = "map",
    val_data: EFAData | None = None,
    num_epochs: int = 100,
    batch_size: int = 64,
    lr: float = 1e-3,
    lr_decay: float | None = None,
    lr_patience: int = 2,
    patience: int = 5,
    seed: int = 0,
    progress: bool = True,
    rank: int = 8,
    init_scale: float = 0.01,
    init_radius: float = 0.05,
    init_intercept: bool = True,
    num_particles: int = 1,
    eval_batch_size: int = 256,
    callback: Callable[[EFAFit], bool | None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    device: str | torch.device | None = None,
) -> EFAFit:
    """Fit ``model`` to ``data`` by SVI.

    :param model: an :class:`EFA`, or a :class:`~pyro.nn.PyroModule` holding one, called as
        ``model(batch)``.
    :param data: training units: an :class:`EFAData`, or a
        :class:`~pyro_efa.streaming.StreamingUnits` that reads units from disk shard by shard
        (data larger than memory).
    :param str guide: ``"map"`` (AutoDelta), ``"normal"`` (AutoNormal) or ``"lowrank"``.
    :param EFAData val_data: validation units for early stopping (plug-in NLL at the posterior
        median); without it all ``num_epochs`` run and the last state is kept.
    :param int num_epochs: maximum number of passes over the training units.
    :param int batch_size: units per step *per process*; with ``torchrun`` the global batch is
        ``batch_size * world_size`` (see :mod:`pyro_efa.distributed`). The unit plate is
        subsampled and rescaled.
    :param float lr: Adam learning rate.
    :param float lr_decay: multiply the learning rate by this factor (in (0, 1)) when the
        validation NLL has not improved for more than ``lr_patience`` epochs in a row
        (:class:`torch.optim.lr_scheduler.ReduceLROnPlateau`; needs ``val_data``); ``None``
        keeps it constant. Give ``patience`` room for a few reductions (e.g. ``lr_patience=2,
        patience=10``).
    :param int lr_patience: epochs without improvement tolerated before each reduction.
    :param int patience: epochs without validation improvement before stopping.
    :param int seed: seeds Pyro, torch and the batch order.
    :param bool progress: show a tqdm progress bar (rank 0 only).
    :param bool init_intercept: start the intercepts at each key's marginal fit.
    :param callback: called after each epoch with the fit so far (current state, its
        ``losses`` and ``val_nll``); returning True stops training. Under ``torchrun`` it is
        called on rank 0 only and its answer is sent to every process.
    :param checkpoint_dir: directory for ``checkpoint.pt`` (rank 0 writes it). Holds model,
        guide and optimizer states, every RNG state (torch, Pyro's Python and NumPy, CUDA; one
        set per process), the batch order of the current epoch and the step within it, the
        history, the early-stopping state, and the data vocabularies and model configuration
        as JSON. Written to a temporary file and renamed, so a kill at any moment leaves the
        previous checkpoint intact.
    :param int checkpoint_every: write a checkpoint every this many optimizer steps (0: never).
    :param bool resume: continue from ``checkpoint_dir/checkpoint.pt`` if it exists (else start
        fresh). On the CPU in one process the resumed fit is bit-identical to an uninterrupted
        one. The options that shape the trajectory (guide, batch size, learning rate, seed,
        number of processes, ...) and the data must be the same; ``num_epochs`` and
        ``patience`` may change.
    :param device: train on this device (default: the model's device; ``cuda:LOCAL_RANK``
        under NCCL). Batches are moved there step by step; the returned fit is on the CPU.
    :returns: the fit, with the best state restored.
    :raises FloatingPointError: when the loss or a gradient is NaN or infinite; the message
        names the step, the epoch and the parameters (latent sites) concerned. The optimizer
        step is not taken and the last good checkpoint is kept.
    """
    if guide not in GUIDES:
        raise ValueError(f"guide must be one of {GUIDES}, got {guide!r}")
    if batch_size < 1 or num_epochs < 1:
        raise ValueError("batch_size and num_epochs must be positive")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be non-negative, got {checkpoint_every}")
    if lr_decay is not None and not 0.0 < lr_decay < 1.0:
        raise ValueError(f"lr_decay must be in (0, 1) or None, got {lr_decay}")
    if lr_decay is not None and val_data is None:
        raise ValueError("lr_decay reacts to the validation NLL: pass val_data too")
    if lr_patience < 0:
        raise ValueError(f"lr_patience must be non-negative, got {lr_patience}")
    if (checkpoint_every or resume) and checkpoint_dir is None:
        raise ValueError("checkpoint_every and resume need a checkpoint_dir")
    if len(data) == 0 or data.num_observations == 0:
        raise ValueError("the training data has no modelled observations")
    start = time.perf_counter()
    this_rank, world = distributed.rank(), distributed.world_size()
    streaming = not isinstance(data, EFAData)
    pyro.set_rng_seed(seed)
    efa = find_efa(model)
    if streaming:
        data.check_with(efa.validate)  # each shard is validated when it is read
    else:
        efa.validate(data)
    if val_data is not None:
        efa.validate(val_data)
    if init_intercept:
        efa.init_intercept(data.sample() if streaming else data)
    dev = torch.device(device) if device is not None else _model_device(model)
    if world > 1 and device is None and distributed.device().type == "cuda":
        dev = distributed.device()
    model.to(dev)
    auto = make_guide(model, guide, rank=rank, init_scale=init_scale, init_radius=init_radius)
    loss_fn = Trace_ELBO(num_particles=num_particles, vectorize_particles=False)(model, auto)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    first = next(data.batches(batch_size)).to(dev)
    loss_fn(first)  # creates the guide's lazy parameters
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=lr)
    scheduler = None
    if lr_decay is not None:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=lr_decay, patience=lr_patience, threshold=1e-6, threshold_mode="abs"
        )
    named = [(n, p) for n, p in loss_fn.named_parameters()]

    options = dict(
        guide=guide, num_epochs=num_epochs, batch_size=batch_size, lr=lr, lr_decay=lr_decay,
        lr_patience=lr_patience, patience=patience, seed=seed, rank=rank, init_scale=init_scale,
        init_radius=init_radius,
    )  # fmt: skip
    trajectory = dict(
        guide=guide, batch_size=batch_size, lr=lr, lr_decay=lr_decay, lr_patience=lr_patience,
        seed=seed, rank=rank, init_scale=init_scale, init_radius=init_radius,
        init_intercept=init_intercept, num_particles=num_particles,
        world_size=world, num_units=data.num_units, num_observations=data.num_observations,
    )  # fmt: skip
    config = {"data": _data_schema_json(data), "model": getattr(model, "config", None)}
    ckpt_path = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME
    if ckpt_path is not None and this_rank == 0:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)

    losses: list[float] = []
    val_hist: list[float] = []
    best: tuple[float, int, dict[str, torch.Tensor]] = (math.inf, 0, copy.deepcopy(loss_fn.state_dict()))
    step, start_epoch, skip, total = 0, 1, 0, 0.0
    epoch_state = generator.get_state()
    resumed_rng = None
    if resume and ckpt_path is not None and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        _check_resumable(ckpt, trajectory, config, ckpt_path)
        try:
            loss_fn.load_state_dict(ckpt["state"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(ckpt["scheduler"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise ValueError(f"{ckpt_path} does not match this model and guide ({e})") from e
        step, start_epoch, skip = ckpt["step"], ckpt["epoch"], ckpt["step_in_epoch"]
        total, losses, val_hist = ckpt["total"], list(ckpt["losses"]), list(ckpt["val_nll"])
        b = ckpt["best"]
        best = (float(b["val"]), int(b["epoch"]), b["state"])
        epoch_state = ckpt["epoch_generator"]
        resumed_rng = ckpt["rng"][this_rank]
        logger.info("resuming from %s at step %d (epoch %d)", ckpt_path, step, start_epoch)

    net: torch.nn.Module = loss_fn
    if world > 1:
        # parameters that no step uses would make DDP wait forever: look for them once
        loss_fn(first).backward()
        unused = [n for n, p in named if p.grad is None]
        optimizer.zero_grad(set_to_none=True)
        net = torch.nn.parallel.DistributedDataParallel(
            loss_fn,
            device_ids=[dev.index] if dev.type == "cuda" else None,
            find_unused_parameters=bool(unused),
        )
        pyro.set_rng_seed(seed + 100_003 * (this_rank + 1))  # independent draws per process
    if resumed_rng is not None:
        _set_rng_state(resumed_rng)
    units_plate = efa.site_name("units")

    def checkpoint(epoch: int, step_in_epoch: int) -> None:
        rngs = distributed.gather_objects(_rng_state()) if world > 1 else [_rng_state()]
        if this_rank != 0:
            return
        assert ckpt_path is not None
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "epoch_generator": epoch_state,
            "state": loss_fn.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "rng": rngs,
            "total": float(total),
            "losses": list(losses),
            "val_nll": list(val_hist),
            "best": {"val": float(best[0]), "epoch": int(best[1]), "state": best[2]},
            "options": trajectory,
            "config": json.dumps(config),
            "versions": {"torch": str(torch.__version__), "pyro": str(pyro.__version__)},
        }
        _write_torch(ckpt_path, state)

    def fail(what: str, epoch: int, batch: EFAData, detail: str) -> NoReturn:
        kept = ""
        if ckpt_path is not None and ckpt_path.is_file():
            kept = f"; the last good checkpoint is kept in {ckpt_path}"
        raise _NonFinite(
            f"{what} at step {step} (epoch {epoch}){detail}{kept}; lower the learning rate or check "
            "the data (very large values, a family that does not fit them)"
        )

    bar = tqdm(
        range(start_epoch, num_epochs + 1),
        desc=f"fit {guide}",
        disable=not progress or this_rank != 0,
        leave=False,
    )
    global_batch = batch_size * world
    for epoch in bar:
        model.train()
        if epoch != start_epoch or skip == 0:
            epoch_state = generator.get_state()
            total = 0.0
        else:
            generator.set_state(epoch_state)
        for i, gb in enumerate(data.batches(global_batch, shuffle=True, generator=generator)):
            if i < skip:  # already done before the checkpoint we resumed from
                continue
            if world > 1:
                idx, factor = distributed.shard(len(gb), this_rank, world)
                batch = gb.subset(idx)
            else:
                batch, factor = gb, 1.0
            batch = batch.to(dev)
            step += 1
            try:
                if world > 1:
                    with _UnitScale(units_plate, factor):
                        loss = net(batch)
                else:
                    loss = net(batch)
            except ValueError as e:
                if not _invalid_values_error(e):
                    raise
                first_line = str(e).split(" Trace Shapes:")[0].strip().splitlines()[0]
                fail(
                    "the model produced invalid (NaN or infinite) parameters", epoch, batch, f": {first_line}"
                )
            optimizer.zero_grad()
            loss.backward()
            loss_value = loss.item()
            grads = [(n, p.grad) for n, p in named if p.grad is not None]
            grads_ok = bool(torch.stack([torch.isfinite(g).all() for _, g in grads]).all()) if grads else True
            contribution = loss_value * len(gb) / (data.num_units * world)
            if world > 1:
                flags = torch.tensor(
                    [contribution, float(not math.isfinite(loss_value)), float(not grads_ok)],
                    dtype=torch.float64,
                    device=dev,
                )
                distributed.all_reduce_sum(flags)
                contribution, loss_bad, grads_bad = float(flags[0]), flags[1] > 0, flags[2] > 0
            else:
                loss_bad, grads_bad = not math.isfinite(loss_value), not grads_ok
            if loss_bad:
                if math.isfinite(loss_value):
                    fail("the loss became NaN or infinite in another process", epoch, batch, "")
                sites = _nonfinite_sites(model, auto, batch)
                where = f" (non-finite log-density in {', '.join(sites[:5])})" if sites else ""
                fail(f"the loss became {loss_value}", epoch, batch, where)
            if grads_bad:
                bad = [_param_label(n) for n, g in grads if not torch.isfinite(g).all()]
                fail("a gradient became NaN or infinite", epoch, batch, f" for {', '.join(bad[:5])}")
            optimizer.step()
            total += contribution
            if checkpoint_every and step % checkpoint_every == 0:
                checkpoint(epoch, i + 1)
        skip = 0
        losses.append(total / data.num_observations)
        val = None
        fitted = EFAFit(
            model, auto, guide, losses, val_hist, epoch, time.perf_counter() - start, _schema(data), {}
        )
        stop = False
        if val_data is not None:
            model.eval()
            val = _validation_nll(fitted, val_data, eval_batch_size, dev, this_rank, world)
            val_hist.append(val)
            if val < best[0] - 1e-6:
                best = (val, epoch, copy.deepcopy(loss_fn.state_dict()))
            elif epoch - best[1] >= patience:
                stop = True
            if scheduler is not None:
                scheduler.step(val)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", **({"val": f"{val:.4f}"} if val is not None else {}))
        if stop:
            break
        if callback is not None:
            answer = bool(callback(fitted)) if this_rank == 0 else False
            if distributed.broadcast_object(answer):
                break
    bar.close()
    if net is not loss_fn:  # drop the DDP wrapper (its reducer holds the process group) now
        del net
        gc.collect()
    best_epoch = len(losses)
    if val_data is not None:
        loss_fn.load_state_dict(best[2])
        best_epoch = best[1]
    model.eval()
    if dev.type != "cpu":
        loss_fn.to("cpu")
    return EFAFit(
        model=model,
        guide=auto,
        guide_type=guide,
        losses=losses,
        val_nll=val_hist,
        best_epoch=best_epoch,
        seconds=time.perf_counter() - start,
        schema=_schema(data),
        options=options,
    )


def _check_resumable(
    ckpt: dict[str, Any], trajectory: dict[str, Any], config: dict[str, Any], path: Path
) -> None:
    saved = ckpt["options"]
    changed = [f"{k}: {saved.get(k)!r} then, {v!r} now" for k, v in trajectory.items() if saved.get(k) != v]
    if changed:
        raise ValueError(
            f"cannot resume from {path}: it was written with other options ({'; '.join(changed)}); "
            "resume with the same options and data, or delete the checkpoint to start over"
        )
    if ckpt["config"].get("data") != json.loads(json.dumps(config["data"])):
        raise ValueError(
            f"cannot resume from {path}: its data vocabularies or columns differ from this data's"
        )
