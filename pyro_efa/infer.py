"""Fitting EFA with SVI: the training loop, in named steps.

:func:`fit` runs stochastic variational inference (``Trace_ELBO`` stepped by Adam) with a guide
over the latent sites (by name, see :mod:`pyro_efa.guides`, or any Pyro guide object). Network
weights are point estimates. Training stops early on the validation negative log-likelihood and
restores the best state. Everything is seeded by ``seed``: the network's initial weights, the
guide's initial values, the batch order and every draw.

The loop is a :class:`Trainer` whose steps are its methods: :meth:`Trainer.__init__` (setup),
:meth:`Trainer.step` (one optimizer step with its checks), :meth:`Trainer.run_epoch`,
:meth:`Trainer.validate` (validation NLL, early stopping, learning-rate decay),
:meth:`Trainer.checkpoint` and :meth:`Trainer.result`.

The model may be an :class:`~pyro_efa.EFA` or any :class:`~pyro.nn.PyroModule` that holds one
and is called as ``model(data, sample=False)`` (a larger model composing EFA).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from tqdm import tqdm

from . import distributed
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    check_resumable,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from .config import FitOptions
from .data import EFAData, data_schema, schema_to_json
from .errors import InputError
from .files import write_torch
from .guides import guide_name, make_guide, recipe
from .model import data_check, find_efa, reset_parameters
from .results import EFAFit, TrainUnits
from .scoring import Scorer, model_device

__all__ = ["Trainer", "fit"]

logger = logging.getLogger(__name__)


def fit(
    model: torch.nn.Module,
    data: Any,
    *,
    guide: str | torch.nn.Module = "map",
    val_data: EFAData | None = None,
    options: FitOptions | None = None,
    progress: bool = True,
    callback: Callable[[EFAFit], bool | None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    **overrides: Any,
) -> EFAFit:
    """Fit ``model`` to ``data`` by SVI.

    :param model: an :class:`~pyro_efa.EFA`, or a :class:`~pyro.nn.PyroModule` holding one,
        called as ``model(batch, sample=False)``.
    :param data: training units: an :class:`~pyro_efa.EFAData`, or a
        :class:`~pyro_efa.streaming.StreamingUnits` that reads units from disk shard by shard.
    :param guide: a name of :data:`pyro_efa.guides.GUIDES` (``"map"``, ``"normal"``,
        ``"lowrank"``, ``"mvn"``, ``"iaf"``; built by :func:`~pyro_efa.guides.make_guide`), or a
        guide object built on ``model``: an autoguide (``AutoMultivariateNormal(model)``, an
        ``AutoGuideList``, ...) or your own :class:`~pyro.nn.PyroModule` guide, for example an
        amortized guide of per-unit latents.
    :param EFAData val_data: validation units for early stopping (plug-in NLL); without it all
        ``num_epochs`` run and the last state is kept.
    :param FitOptions options: the training options (default ``FitOptions()``); ``overrides``
        replace its fields (``num_epochs=``, ``batch_size=``, ``lr=``, ``seed=``, ...).
    :param bool progress: show a tqdm progress bar (rank 0 only).
    :param callback: called after each epoch with the fit so far; returning True stops training.
        Under ``torchrun`` it is called on rank 0 only and its answer is sent to every process.
    :param checkpoint_dir: directory for ``checkpoint.pt`` (see :mod:`pyro_efa.checkpoint`),
        written every ``checkpoint_every`` optimizer steps, atomically.
    :param bool resume: continue from ``checkpoint_dir/checkpoint.pt`` if it exists (else start
        fresh). On the CPU in one process (same thread count) the resumed fit is bit-identical
        to an uninterrupted one. The options that shape the trajectory and the data must be the
        same; ``num_epochs`` and ``patience`` may change.
    :param device: train on this device (default: the model's device; ``cuda:LOCAL_RANK`` under
        NCCL). Batches are moved there step by step; the returned fit is on the CPU.
    :returns: the fit, with the best state restored.
    :raises FloatingPointError: when the loss or a gradient is NaN or infinite; the message names
        the step, the epoch and the parameters (latent sites) concerned. The optimizer step is
        not taken and the last good checkpoint is kept.
    """
    options = (options or FitOptions()).replace(**overrides)
    if (options.checkpoint_every or resume) and checkpoint_dir is None:
        raise InputError("checkpoint_every and resume need a checkpoint_dir")
    with _threads(options.threads):
        trainer = Trainer(
            model, data, guide=guide, val_data=val_data, options=options, device=device,
            checkpoint_dir=checkpoint_dir, resume=resume,
        )  # fmt: skip
        return trainer.run(progress=progress, callback=callback)


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class _NonFinite(FloatingPointError):
    """A non-finite loss or gradient (a :class:`FloatingPointError`)."""


class Trainer:
    """The training loop of :func:`fit`, one method per step (see the module docs).

    Setup (this constructor): check the data (every split, before any training), seed and draw
    the network's initial weights, start the intercepts at the marginal fit, build the guide
    and the loss ``Trace_ELBO()(model, guide)`` (the guide's parameters are created by a first
    call), the optimizer and the learning-rate schedule, resume from a checkpoint, and wrap the
    loss in DDP under ``torchrun``. The arguments are those of :func:`fit`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        data: Any,
        *,
        guide: str | torch.nn.Module,
        val_data: EFAData | None,
        options: FitOptions,
        device: str | torch.device | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = False,
    ) -> None:
        self.start = time.perf_counter()
        self.model, self.data, self.options = model, data, options
        # validation units built on their own mean what the training units mean
        self.val_data = None if val_data is None else val_data.conform(data_schema(data))
        self.rank, self.world = distributed.rank(), distributed.world_size()
        if len(data) == 0 or data.num_observations == 0:
            raise InputError("the training data has no modelled observations")
        if options.lr_decay is not None and val_data is None:
            raise InputError("lr_decay reacts to the validation NLL: pass val_data too")
        self.efa = find_efa(model)
        self._check_data()
        given = None if isinstance(guide, str) else _check_guide(guide)
        self._initialise(given)
        self.device = torch.device(device) if device is not None else model_device(model)
        if self.world > 1 and device is None and distributed.device().type == "cuda":
            self.device = distributed.device()
        model.to(self.device)
        self.guide = make_guide(model, guide) if given is None else given
        self._setup_loss()
        self.ckpt_path = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME
        if self.ckpt_path is not None and self.rank == 0:
            self.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        self.losses: list[float] = []
        self.val_nll: list[float] = []
        self.best: tuple[float, int, dict[str, torch.Tensor]] = (math.inf, 0, self._state())
        self.step_count, self.start_epoch, self.skip, self.total = 0, 1, 0, 0.0
        self.epoch_state = self.generator.get_state()
        self.epoch = self.start_epoch
        resumed = (
            self._resume() if resume and self.ckpt_path is not None and self.ckpt_path.is_file() else None
        )
        self.net = self._wrap_ddp()
        if resumed is not None:
            set_rng_state(resumed)
        self.val_scorer = self._validation_scorer()

    # -- setup -------------------------------------------------------------------------------------
    def _check_data(self) -> None:
        # the whole table is checked before the first epoch (a streamed part as each shard is read)
        check = data_check(self.model)
        if isinstance(self.data, EFAData):
            check(self.data)
        else:
            self.data.check_with(check)
        if self.val_data is not None:
            check(self.val_data)

    def _initialise(self, guide: torch.nn.Module | None) -> None:
        # the network's initial weights from the seed (and those of a guide object's modules),
        # then the intercepts at the marginal fit; parameters frozen by the user
        # (requires_grad=False) keep their values
        frozen = {n: p.detach().clone() for n, p in self.model.named_parameters() if not p.requires_grad}
        if self.options.init_network:
            pyro.set_rng_seed(self.options.seed)
            reset_parameters(self.model)
            if guide is not None:
                reset_parameters(guide, skip=self.model)
        pyro.set_rng_seed(self.options.seed)  # everything after the weights draws from the seed too
        if self.options.init_intercept:
            self.efa.init_intercept(self.data if isinstance(self.data, EFAData) else self.data.sample())
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if name in frozen:
                    p.copy_(frozen[name])

    def _setup_loss(self) -> None:
        opts = self.options
        self.loss_fn = Trace_ELBO(num_particles=opts.num_particles, vectorize_particles=False)(
            self.model, self.guide
        )
        self.generator = torch.Generator().manual_seed(opts.seed)
        self.model.train()
        self.first = next(self.data.batches(opts.batch_size)).to(self.device)
        self.loss_fn(self.first)  # creates the guide's lazy parameters
        self.optimizer = torch.optim.Adam(self.loss_fn.parameters(), lr=opts.lr)
        self.scheduler = None
        if opts.lr_decay is not None:
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, factor=opts.lr_decay, patience=opts.lr_patience, threshold=1e-6,
                threshold_mode="abs",
            )  # fmt: skip
        self.named = list(self.loss_fn.named_parameters())
        self.params = [p for _, p in self.named]

    def _state(self) -> dict[str, torch.Tensor]:
        return copy.deepcopy(self.loss_fn.state_dict())

    def trajectory(self) -> dict[str, Any]:
        """The options that shape the fit's trajectory: a checkpoint resumes only under them."""
        opts = self.options
        return {
            "guide": recipe(self.guide) or guide_name(self.guide), "batch_size": opts.batch_size,
            "lr": opts.lr, "lr_decay": opts.lr_decay, "lr_patience": opts.lr_patience,
            "seed": opts.seed, "init_network": opts.init_network, "init_intercept": opts.init_intercept,
            "num_particles": opts.num_particles, "world_size": self.world,
            "num_units": self.data.num_units, "num_observations": self.data.num_observations,
        }  # fmt: skip

    def _config(self) -> dict[str, Any]:
        return {"data": schema_to_json(data_schema(self.data)), "model": self.efa.config.to_dict()}

    def _resume(self) -> dict[str, Any]:
        assert self.ckpt_path is not None
        ckpt = load_checkpoint(self.ckpt_path)
        check_resumable(ckpt, self.trajectory(), self._config(), self.ckpt_path)
        try:
            self.loss_fn.load_state_dict(ckpt["state"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(ckpt["scheduler"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise InputError(f"{self.ckpt_path} does not match this model and guide ({e})") from e
        self.step_count, self.start_epoch, self.skip = ckpt["step"], ckpt["epoch"], ckpt["step_in_epoch"]
        self.total, self.losses, self.val_nll = ckpt["total"], list(ckpt["losses"]), list(ckpt["val_nll"])
        b = ckpt["best"]
        self.best = (float(b["val"]), int(b["epoch"]), b["state"])
        self.epoch_state = ckpt["epoch_generator"]
        logger.info(
            "resuming from %s at step %d (epoch %d)", self.ckpt_path, self.step_count, self.start_epoch
        )
        return ckpt["rng"][self.rank]

    def _wrap_ddp(self) -> torch.nn.Module:
        if self.world == 1:
            return self.loss_fn
        # parameters that no step uses would make DDP wait forever: look for them once
        self.loss_fn(self.first).backward()
        unused = [n for n, p in self.named if p.grad is None]
        self.optimizer.zero_grad(set_to_none=True)
        net = torch.nn.parallel.DistributedDataParallel(
            self.loss_fn,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=bool(unused),
        )
        pyro.set_rng_seed(self.options.seed + 100_003 * (self.rank + 1))  # independent draws per process
        return net

    def _validation_scorer(self) -> Scorer | None:
        if self.val_data is None:
            return None
        part = self.val_data
        if self.world > 1:  # each process scores its share; the totals are summed
            part = part.subset(torch.arange(self.rank, len(part), self.world))
        return Scorer(self._fit_so_far(), part, self.options.eval_batch_size) if len(part) else None

    # -- one step ----------------------------------------------------------------------------------
    def step(self, batch: EFAData, factor: float = 1.0) -> float:
        """One optimizer step on ``batch`` (already on the device): the loss, its gradient, one
        read-out of the loss and of the gradient norm (a single device synchronisation) to check
        that both are finite, then the Adam step. Returns the loss (under DDP: summed over the
        processes, in the same collective as the checks).

        :param float factor: this process's scale of the unit plate under DDP.
        """
        self.step_count += 1
        scale = distributed.UnitScale(self.efa.site_name("units"), factor) if self.world > 1 else None
        # no argument checks of every distribution per step: the data were checked before
        # training, and a NaN or infinite parameter shows in the loss check below
        with pyro.validation_enabled(False), scale or contextlib.nullcontext():
            loss = self.net(batch)
        self.optimizer.zero_grad()
        loss.backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = _total_norm(grads) if grads else loss.new_zeros(())
        loss_value, norm_value = torch.stack([loss.detach(), norm.to(loss.dtype)]).tolist()
        bad = [not math.isfinite(loss_value), not math.isfinite(norm_value)]
        total = loss_value
        if self.world > 1:
            stats = torch.tensor(
                [loss_value if not bad[0] else 0.0, *bad], dtype=torch.float64, device=self.device
            )
            total, *flags = distributed.all_reduce_sum(stats).tolist()
            bad = [f > 0 for f in flags]
        if bad[0]:
            self._fail_loss(loss_value, batch)
        if bad[1]:
            self._fail("a gradient became NaN or infinite", batch, self._bad_gradients())
        self.optimizer.step()
        return total

    def _bad_gradients(self) -> str:
        names = [
            _param_label(n) for n, p in self.named if p.grad is not None and not torch.isfinite(p.grad).all()
        ]
        return f" for {', '.join(names[:5])}" if names else " (their norm overflowed)"

    def _fail_loss(self, loss_value: float, batch: EFAData) -> NoReturn:
        if math.isfinite(loss_value):
            self._fail("the loss became NaN or infinite in another process", batch, "")
        sites = _nonfinite_sites(self.model, self.guide, batch)
        where = f" (non-finite log-density in {', '.join(sites[:5])})" if sites else ""
        self._fail(f"the loss became {loss_value}", batch, where)

    def _fail(self, what: str, batch: EFAData, detail: str) -> NoReturn:
        kept = ""
        if self.ckpt_path is not None and self.ckpt_path.is_file():
            kept = f"; the last good checkpoint is kept in {self.ckpt_path}"
        raise _NonFinite(
            f"{what} at step {self.step_count} (epoch {self.epoch}){detail}{kept}; lower the learning "
            "rate or check the data (very large values, a family that does not fit them)"
        )

    # -- one epoch ---------------------------------------------------------------------------------
    def run_epoch(self, epoch: int) -> None:
        """One pass over the training units in a seeded random order (global batches of
        ``batch_size * world_size`` units, each process taking its share); appends the mean
        training loss per observation to :attr:`losses`."""
        self.epoch = epoch
        self.model.train()
        if epoch != self.start_epoch or self.skip == 0:
            self.epoch_state = self.generator.get_state()
            self.total = 0.0
        else:
            self.generator.set_state(self.epoch_state)
        global_batch = self.options.batch_size * self.world
        for i, gb in enumerate(self.data.batches(global_batch, shuffle=True, generator=self.generator)):
            if i < self.skip:  # already done before the checkpoint we resumed from
                continue
            if self.world > 1:
                idx, factor = distributed.shard(len(gb), self.rank, self.world)
                batch = gb.subset(idx)
            else:
                batch, factor = gb, 1.0
            loss = self.step(batch.to(self.device), factor)
            self.total += loss * len(gb) / (self.data.num_units * self.world)
            if self.options.checkpoint_every and self.step_count % self.options.checkpoint_every == 0:
                self.checkpoint(epoch, i + 1)
        self.skip = 0
        self.losses.append(self.total / self.data.num_observations)

    # -- validation --------------------------------------------------------------------------------
    def validate(self, epoch: int) -> bool:
        """The validation NLL per observation at the plug-in values (summed over processes),
        the best state so far, the learning-rate schedule; returns whether to stop early."""
        if self.val_data is None:
            return False
        self.model.eval()
        local = (
            self.val_scorer.loglik_total()
            if self.val_scorer is not None
            else torch.zeros((), dtype=torch.float64)
        )
        total = distributed.all_reduce_sum(local.reshape(1).to(self.device, torch.float64))
        val = -float(total[0]) / self.val_data.num_observations
        self.val_nll.append(val)
        stop = False
        if val < self.best[0] - 1e-6:
            self.best = (val, epoch, self._state())
        elif epoch - self.best[1] >= self.options.patience:
            stop = True
        if self.scheduler is not None:
            self.scheduler.step(val)
        return stop

    # -- checkpoints -------------------------------------------------------------------------------
    def checkpoint(self, epoch: int, step_in_epoch: int) -> None:
        """Write ``checkpoint.pt`` (rank 0; every process contributes its random state)."""
        rngs = distributed.gather_objects(rng_state()) if self.world > 1 else [rng_state()]
        if self.rank != 0:
            return
        assert self.ckpt_path is not None
        state = {
            "format": CHECKPOINT_FORMAT, "step": self.step_count, "epoch": epoch,
            "step_in_epoch": step_in_epoch, "epoch_generator": self.epoch_state,
            "state": self.loss_fn.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "rng": rngs, "total": float(self.total), "losses": list(self.losses),
            "val_nll": list(self.val_nll),
            "best": {"val": float(self.best[0]), "epoch": int(self.best[1]), "state": self.best[2]},
            "options": json.loads(json.dumps(self.trajectory())), "config": json.dumps(self._config()),
            "versions": {"torch": str(torch.__version__), "pyro": str(pyro.__version__)},
        }  # fmt: skip
        write_torch(self.ckpt_path, state)

    # -- the loop and its result ---------------------------------------------------------------------
    def run(self, progress: bool = True, callback: Callable[[EFAFit], bool | None] | None = None) -> EFAFit:
        """Epochs until ``num_epochs``, early stopping or the callback; then :meth:`result`."""
        bar = tqdm(
            range(self.start_epoch, self.options.num_epochs + 1),
            desc=f"fit {guide_name(self.guide)}",
            disable=not progress or self.rank != 0,
            leave=False,
        )
        for epoch in bar:
            self.run_epoch(epoch)
            stop = self.validate(epoch)
            shown = {"val": f"{self.val_nll[-1]:.4f}"} if self.val_nll else {}
            bar.set_postfix(loss=f"{self.losses[-1]:.4f}", **shown)
            if stop:
                break
            if callback is not None:
                answer = bool(callback(self._fit_so_far())) if self.rank == 0 else False
                if distributed.broadcast_object(answer):
                    break
        bar.close()
        return self.result()

    def _fit_so_far(self) -> EFAFit:
        return EFAFit(
            model=self.model, guide=self.guide, guide_name=guide_name(self.guide), losses=self.losses,
            val_nll=self.val_nll, best_epoch=len(self.losses), seconds=time.perf_counter() - self.start,
            schema=data_schema(self.data), options=self.options,
            train_units=TrainUnits.of(self.data) if isinstance(self.data, EFAData) else None,
        )  # fmt: skip

    def result(self) -> EFAFit:
        """The fit: the best validation state restored (else the last), on the CPU."""
        if self.net is not self.loss_fn:  # drop the DDP wrapper (its reducer holds the process group)
            self.net = self.loss_fn
            gc.collect()
        fitted = self._fit_so_far()
        if self.val_data is not None:
            self.loss_fn.load_state_dict(self.best[2])
            fitted.best_epoch = self.best[1]
        self.model.eval()
        if self.device.type != "cpu":
            self.loss_fn.to("cpu")
        fitted.seconds = time.perf_counter() - self.start
        return fitted


# ------------------------------------------------------------------------------------------------
def _check_guide(guide: Any) -> torch.nn.Module:
    if not isinstance(guide, torch.nn.Module):
        raise TypeError(
            f"a guide object must be a torch.nn.Module (an autoguide, or a pyro.nn.PyroModule) so that "
            f"its parameters are trained with the model's; got {type(guide).__name__}. Wrap a guide "
            "function in an AutoGuideList (guide.append(fn)) or write it as a PyroModule"
        )
    return guide


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    # the 2-norm of all gradients in one fused reduction: finite exactly when every entry is
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:
        return get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


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


def _nonfinite_sites(model: torch.nn.Module, guide: Any, batch: EFAData) -> list[str]:
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
