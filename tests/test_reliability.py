"""Checkpoints and resume (SIGKILL mid-run), safe files, and the non-finite guard of :func:`fit`."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from pyro.nn import PyroModule

from pyro_efa import EFA, EFAData, fit, load, save
from pyro_efa.checkpoint import CHECKPOINT_NAME, load_checkpoint

SCRIPT = Path(__file__).resolve().parent / "scripts" / "train_small.py"
SMALL = dict(dim=8, num_layers=1, num_heads=1, head_dim=8)


def _state(f) -> dict[str, torch.Tensor]:
    return {
        **{f"model.{k}": v.detach().clone() for k, v in f.model.state_dict().items()},
        **{f"guide.{k}": v.detach().clone() for k, v in f.guide.state_dict().items()},
    }


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


# ----------------------------------------------------------------------------------------------
# checkpoints and resume


def test_sigkill_and_resume_is_bit_identical(tmp_path: Path) -> None:
    """A training subprocess is killed with SIGKILL after its first checkpoint (mid-epoch, with a
    sampling guide and early-stopping state); resuming it ends bit-identical to a run that was
    never interrupted: parameters, losses and validation history."""
    common = ["--epochs", "4", "--val", "--guide", "normal", "--dtype", "float32"]
    full = _run(str(tmp_path / "full.pt"), *common)
    assert full.returncode == 0, full.stderr

    ckpt_dir = tmp_path / "ckpt"
    out = tmp_path / "resumed.pt"
    args = [str(out), *common, "--checkpoint-dir", str(ckpt_dir), "--every", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), *args, "--sleep", "0.05"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            deadline = time.monotonic() + 60
            while not (ckpt_dir / CHECKPOINT_NAME).is_file():
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "no checkpoint within 60 s"
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # killed before the end
    ckpt = load_checkpoint(ckpt_dir)
    steps_per_epoch = 5  # 72 training units, batches of 16
    assert 3 <= ckpt["step"] < 4 * steps_per_epoch
    assert not [p for p in ckpt_dir.iterdir() if p.name != CHECKPOINT_NAME]  # no temporary files

    resumed = _run(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = torch.load(tmp_path / "full.pt"), torch.load(out)
    assert a["losses"] == b["losses"] and a["val_nll"] == b["val_nll"]
    for part in ("model", "guide"):
        _assert_identical(a["state"][part], b["state"][part])


@pytest.mark.parametrize("lr_decay", [None, 0.5])
def test_resume_in_process_is_bit_identical(counts: EFAData, tmp_path: Path, lr_decay: float | None) -> None:
    train, val = counts.split((0.75, 0.25), seed=0)

    def run(num_epochs: int, **kwargs) -> object:
        torch.manual_seed(1)
        model = EFA.from_data(train, family="poisson", **SMALL)
        return fit(
            model, train, val_data=val, num_epochs=num_epochs, batch_size=8, lr=0.01, patience=50,
            lr_decay=lr_decay, lr_patience=0, progress=False, seed=5, **kwargs,
        )  # fmt: skip

    whole = run(5)
    run(2, checkpoint_dir=tmp_path, checkpoint_every=4)  # "interrupted" after 2 epochs
    assert load_checkpoint(tmp_path)["epoch"] == 2
    again = run(5, checkpoint_dir=tmp_path, checkpoint_every=4, resume=True)
    assert again.losses == whole.losses and again.val_nll == whole.val_nll
    assert again.best_epoch == whole.best_epoch
    _assert_identical(_state(whole), _state(again))


def test_resume_without_checkpoint_starts_fresh(counts: EFAData, tmp_path: Path) -> None:
    torch.manual_seed(0)
    a = fit(EFA.from_data(counts, family="poisson", **SMALL), counts, num_epochs=1, progress=False)
    torch.manual_seed(0)
    b = fit(
        EFA.from_data(counts, family="poisson", **SMALL), counts, num_epochs=1, progress=False,
        checkpoint_dir=tmp_path / "new", resume=True,
    )  # fmt: skip
    _assert_identical(_state(a), _state(b))


def test_resume_rejects_other_options_or_data(counts: EFAData, tmp_path: Path) -> None:
    fit(
        EFA.from_data(counts, family="poisson", **SMALL), counts, num_epochs=1, batch_size=16,
        progress=False, checkpoint_dir=tmp_path, checkpoint_every=2,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"other options \(lr: 0.001 then, 0.01 now"):
        fit(
            EFA.from_data(counts, family="poisson", **SMALL), counts, num_epochs=2, batch_size=16,
            lr=0.01, progress=False, checkpoint_dir=tmp_path, resume=True,
        )  # fmt: skip
    other = counts.subset(range(40), reindex=True)
    with pytest.raises(ValueError, match="cannot resume"):
        fit(
            EFA.from_data(counts, family="poisson", **SMALL), other, num_epochs=2, batch_size=16,
            progress=False, checkpoint_dir=tmp_path, resume=True,
        )  # fmt: skip
    with pytest.raises(ValueError, match="checkpoint_dir"):
        fit(EFA.from_data(counts, family="poisson", **SMALL), counts, checkpoint_every=3, progress=False)


def test_checkpoint_contents(counts: EFAData, tmp_path: Path) -> None:
    fit(
        EFA.from_data(counts, family="poisson", name="efa", **SMALL), counts, num_epochs=2, batch_size=16,
        progress=False, checkpoint_dir=tmp_path, checkpoint_every=3,
    )  # fmt: skip
    ckpt = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert ckpt["step"] == 6 and ckpt["epoch"] == 2 and ckpt["step_in_epoch"] == 2  # 4 steps / epoch
    assert {"model.intercept", "guide.efa.alpha_unconstrained"} <= set(ckpt["state"])
    assert ckpt["optimizer"]["state"] and len(ckpt["rng"]) == 1
    assert set(ckpt["rng"][0]) == {"torch", "python", "numpy", "cuda"}
    assert ckpt["config"]["data"]["keys"]["labels"] == list(range(8))
    assert ckpt["config"]["model"]["family"] == ["poisson"] * 8
    assert ckpt["options"]["batch_size"] == 16 and ckpt["options"]["world_size"] == 1


def test_checkpoint_write_is_atomic(counts: EFAData, tmp_path: Path, monkeypatch) -> None:
    """A crash while a checkpoint is written leaves the previous one intact and no debris."""
    kwargs = dict(num_epochs=1, batch_size=16, progress=False, checkpoint_dir=tmp_path, checkpoint_every=1)
    fit(EFA.from_data(counts, family="poisson", **SMALL), counts, **kwargs)
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    real_save = torch.save

    def half_save(obj, f) -> None:
        real_save(obj, f)
        f.truncate(100)  # what a kill in the middle of the write leaves
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(OSError, match="disk full"):
        fit(EFA.from_data(counts, family="poisson", **SMALL), counts, **kwargs)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]


# ----------------------------------------------------------------------------------------------
# safe files


class _Boom:
    """Unpickling this runs a command: what a malicious checkpoint would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious(path: Path, marker: Path, wrap: bool) -> None:
    payload = {"format": "pyro_efa.checkpoint/1", "model": {"x": _Boom(marker)}, "guide": {}}
    if wrap:  # a torch zip file with the payload inside
        torch.save(payload, path)
    else:  # a bare pickle
        path.write_bytes(pickle.dumps(payload))


@pytest.mark.parametrize("wrap", [True, False], ids=["torch-zip", "bare-pickle"])
def test_tampered_files_never_run_code(counts: EFAData, tmp_path: Path, wrap: bool) -> None:
    f = fit(EFA.from_data(counts, family="poisson", **SMALL), counts, num_epochs=1, progress=False)
    save(f, tmp_path / "fit")
    marker = tmp_path / "pwned"
    _malicious(tmp_path / "fit" / "params.pt", marker, wrap)
    with pytest.raises(ValueError, match=r"params.pt could not be read") as info:
        load(tmp_path / "fit")
    if wrap:
        assert "never loaded" in str(info.value) and "posix.system" in str(info.value)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _malicious(ckpt / CHECKPOINT_NAME, marker, wrap)
    with pytest.raises(ValueError, match="could not be read as a pyro_efa checkpoint"):
        load_checkpoint(ckpt)
    with pytest.raises(ValueError, match="could not be read"):
        fit(
            EFA.from_data(counts, family="poisson", **SMALL), counts, num_epochs=1, progress=False,
            checkpoint_dir=ckpt, resume=True,
        )  # fmt: skip
    assert not marker.exists()


def test_truncated_and_foreign_checkpoints(counts: EFAData, tmp_path: Path) -> None:
    fit(
        EFA.from_data(counts, family="poisson", **SMALL), counts, num_epochs=1, progress=False,
        checkpoint_dir=tmp_path, checkpoint_every=1,
    )  # fmt: skip
    path = tmp_path / CHECKPOINT_NAME
    data = path.read_bytes()
    for cut in (0, 10, len(data) // 2, len(data) - 10):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated, damaged or not a torch file"):
            load_checkpoint(path)
    torch.save({"weights": torch.zeros(3)}, path)  # a torch file, but not ours
    with pytest.raises(ValueError, match="is not a pyro_efa.checkpoint/1 file"):
        load_checkpoint(path)
    torch.save({"format": "pyro_efa.checkpoint/1", "step": "three"}, path)
    with pytest.raises(ValueError, match="damaged: entry 'step'"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="no checkpoint"):
        load_checkpoint(tmp_path / "elsewhere")


def _with(config: dict, part: str, **changes) -> str:
    return json.dumps({**config, part: {**config[part], **changes}})


@pytest.mark.parametrize(
    "tamper, match",
    [
        pytest.param(lambda c: "{not json", "readable", id="not-json"),
        pytest.param(lambda c: json.dumps([1, 2]), "not a pyro_efa.fit/2", id="a-list"),
        pytest.param(lambda c: _with(c, "model", evil=1), "damaged", id="extra-option"),
        pytest.param(lambda c: _with(c, "model", dim=-3), "damaged", id="bad-dim"),
        pytest.param(lambda c: json.dumps({**c, "guide": "__import__"}), "damaged", id="bad-guide"),
        pytest.param(lambda c: json.dumps({**c, "history": None}), "damaged", id="no-history"),
        pytest.param(lambda c: _with(c, "model", dim=4), "does not match", id="shape"),
    ],
)  # fmt: skip
def test_tampered_config_is_a_clear_error(counts: EFAData, tmp_path: Path, tamper, match: str) -> None:
    f = fit(EFA.from_data(counts, family="poisson", **SMALL), counts, num_epochs=1, progress=False)
    save(f, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(tamper(config))
    with pytest.raises(ValueError, match=match):
        load(tmp_path)


# ----------------------------------------------------------------------------------------------
# the non-finite guard


class Poisoned(PyroModule):
    """EFA whose natural parameters turn NaN from the ``after``-th call on."""

    def __init__(self, efa: EFA, after: int) -> None:
        super().__init__()
        self.efa = efa
        self.after = after
        self.calls = 0

    def forward(self, data: EFAData, sample: bool = False) -> torch.Tensor:
        self.calls += 1
        eta = self.efa.natural_params(data)
        if self.training and self.calls > self.after:
            eta = eta * float("nan")
        return self.efa.observe(data, eta, sample=sample)


@pytest.mark.filterwarnings("ignore:Encountered NaN:UserWarning")  # Pyro's, before our error
@pytest.mark.parametrize("validate", [True, False], ids=["validated", "unvalidated"])
def test_nan_loss_stops_with_step_and_site(counts: EFAData, tmp_path: Path, validate: bool) -> None:
    torch.manual_seed(0)
    model = Poisoned(EFA.from_data(counts, family="poisson", name="efa", **SMALL), after=6)
    with pyro.validation_enabled(validate):
        with pytest.raises(FloatingPointError) as info:
            fit(
                model, counts, num_epochs=3, batch_size=16, progress=False, checkpoint_dir=tmp_path,
                checkpoint_every=2,
            )  # fmt: skip
    text = str(info.value)
    # the guide traces the model once, then one call creates its parameters; steps are calls
    # 3, 4, ...: call 7 is step 5, the first of epoch 2 (4 steps per epoch)
    assert "at step 5 (epoch 2)" in text, text
    assert ("found invalid values" in text) if validate else ("'efa.x'" in text), text
    assert f"last good checkpoint is kept in {tmp_path}" in text
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["step"] == 4  # the last good step (a checkpoint step)
    assert all(torch.isfinite(v).all() for v in ckpt["state"].values() if v.is_floating_point())


def test_nan_gradient_names_the_latent_site(counts: EFAData, tmp_path: Path) -> None:
    def poison_alpha(fitted) -> None:  # after epoch 1, alpha's gradient becomes NaN
        for name, p in fitted.guide.named_parameters():
            if "alpha" in name:
                p.register_hook(lambda g: g * float("nan"))

    torch.manual_seed(0)
    model = EFA.from_data(counts, family="poisson", name="efa", **SMALL)
    with pytest.raises(FloatingPointError) as info:
        fit(
            model, counts, num_epochs=3, batch_size=16, progress=False, callback=poison_alpha,
            checkpoint_dir=tmp_path, checkpoint_every=1,
        )  # fmt: skip
    text = str(info.value)
    assert "gradient became NaN or infinite at step 5 (epoch 2) for latent site 'efa.alpha'" in text, text
    assert "rho" not in text  # only the poisoned site is named
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["step"] == 4  # the last good step; the bad one was neither taken nor saved
    assert torch.isfinite(ckpt["state"]["guide.efa.alpha_unconstrained"]).all()


# ----------------------------------------------------------------------------------------------
# numerics: float32 vs float64, large values


def _ratings(num_users: int, transform=lambda r: r) -> tuple[EFAData, EFAData]:
    from pyro_efa.datasets import synthetic_ratings

    df = synthetic_ratings(num_users, seed=42)
    data = EFAData.from_pandas(
        df.assign(rating=transform(df["rating"])), "user", "movie", "rating", order="position"
    )
    return data.split((0.75, 0.25), seed=0)


def test_float32_and_float64_fits_agree() -> None:
    """The same fit in float32 and float64 (same initial values, same batches): predictive means
    agree within 1e-4 (values of order 1-10; measured about 1e-6 after 25 steps) and the test
    NLL within 1e-5 relative."""
    import copy

    from pyro_efa import evaluate
    from pyro_efa.scoring import Scorer

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        train, test = _ratings(200)
        torch.manual_seed(0)
        m64 = EFA.from_data(train, dim=8, num_layers=2)
        m32 = copy.deepcopy(m64).float()
        out = {}
        for dtype, model in ((torch.float64, m64), (torch.float32, m32)):
            torch.set_default_dtype(dtype)
            tr, te = copy.copy(train), copy.copy(test)
            tr.values, te.values = train.values.to(dtype), test.values.to(dtype)
            f = fit(model, tr, num_epochs=5, lr=3e-3, progress=False, seed=1, init_network=False)
            assert next(f.model.parameters()).dtype == dtype
            scorer = Scorer(f, te)
            out[dtype] = (evaluate(f, te), scorer.score(scorer.latents()).prediction.double(), f.losses)
    finally:
        torch.set_default_dtype(old)
    (e64, p64, l64), (e32, p32, l32) = out[torch.float64], out[torch.float32]
    real = test.target & test.mask
    assert float((p64 - p32)[real].abs().max()) < 1e-4
    assert e32["nll"] == pytest.approx(e64["nll"], rel=1e-5)
    assert e32["mse"] == pytest.approx(e64["mse"], rel=1e-5)
    np.testing.assert_allclose(l32, l64, rtol=1e-5)
    assert l64[-1] < l64[0]  # it did train


def test_gaussian_values_near_1e8_train_like_small_ones() -> None:
    """Values 1e8 + 1000 * rating: the model standardises Gaussian keys, so the fit is the fit of
    the ratings in other units (test MSE / 1e6 within 3% of the small-value fit), and
    predictions come back in the data's units."""
    from pyro_efa import evaluate, predict

    results = {}
    for name, transform in (("small", lambda r: r), ("large", lambda r: 1e8 + 1e3 * r)):
        train, test = _ratings(300, transform)
        torch.manual_seed(0)
        model = EFA.from_data(train, **SMALL)
        assert model.standardize
        f = fit(model, train, num_epochs=6, lr=3e-3, progress=False)
        assert all(np.isfinite(f.losses))
        results[name] = evaluate(f, test)
        table = predict(f, test)
    assert results["large"]["mse"] / 1e6 == pytest.approx(results["small"]["mse"], rel=0.03)
    assert np.abs(table["prediction"] - 1e8).max() < 2e4  # data units, near the values
    assert np.abs(table["prediction"] - table["value"]).mean() < 3e3


def test_poisson_counts_near_1e6_train() -> None:
    from pyro_efa import evaluate

    """Counts 1e6 + 1000 * rating (log link: eta near 13.8): finite losses and a fit that beats
    the intercept-only model, each key's training mean (measured with 800 users: MSE 0.69 of the
    variance for the fit, 0.96 for the intercept-only model)."""
    train, test = _ratings(800, lambda r: np.round(1e6 + 1e3 * r).clip(0))
    torch.manual_seed(0)
    f = fit(EFA.from_data(train, family="poisson", **SMALL), train, num_epochs=8, lr=3e-3, progress=False)
    assert all(np.isfinite(f.losses)) and f.losses[-1] < f.losses[0]
    m = evaluate(f, test)
    held_out = test.target & test.mask
    x, keys = test.values[held_out].double(), test.key_index[held_out]
    trained = train.target & train.mask
    key_mean = torch.zeros(len(train.keys), dtype=torch.float64).index_add_(
        0, train.key_index[trained], train.values[trained].double()
    ) / torch.bincount(train.key_index[trained], minlength=len(train.keys)).clamp(min=1)
    intercept_only = float(((x - key_mean[keys]) ** 2).mean())
    assert np.isfinite(m["nll"]) and m["mse"] < intercept_only, (m["mse"], intercept_only, float(x.var()))


def test_float32_precision_loss_is_reported() -> None:
    from pyro_efa.data import PrecisionWarning

    with pytest.warns(PrecisionWarning, match="spacing of 8.*float64"):
        _ratings(20, lambda r: 1e8 + r)
