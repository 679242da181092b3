"""Training callbacks: non-finite guard, testbed image grids, throughput, checkpoints.

* :class:`NonFiniteGuard` — zeroes NaN/Inf gradient entries before the optimizer step and stops
  training after ``max_consecutive`` non-finite losses in a row (CAD's ``FixNANinGrad``: 5).
* :class:`TestbedImageLogger` — every ``every_n_steps`` optimizer steps, samples the prompt
  testbed with the EMA weights (fixed noise seed, as CAD's ``LogGeneratedImages`` with seed
  3407), writes a PNG grid atomically under ``<run>/images/`` and hands it to the logger; for
  Shapes models it also scores the grid with the exact Shapes rewards (cheap progress metrics
  that need no full ShapesEval).
* :class:`Throughput` — samples/s and the cumulative corrupt-sample count.
* :func:`checkpoint_callback` — ``last.ckpt`` plus periodic step checkpoints, and both again at
  the step where training stops, written through :class:`AtomicCheckpointIO` (temp file in the
  same folder + rename).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from miro.io import atomic_path


class NonFiniteGuard(Callback):
    """Zero non-finite gradients; stop after ``max_consecutive`` non-finite losses in a row."""

    def __init__(self, max_consecutive: int = 5):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1; got {max_consecutive}")
        self.max_consecutive = int(max_consecutive)
        self.consecutive = 0
        self.total_bad_grads = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        bad = False
        for p in pl_module.parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                p.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
                bad = True
        if bad:
            self.total_bad_grads += 1
            pl_module.log("train/nonfinite_grad_steps", float(self.total_bad_grads))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        finite = bool(torch.isfinite(torch.as_tensor(loss)).all())
        # Every rank must count the same: a rank that stopped alone would leave the others waiting
        # in their next all-reduce (a hang under srun). Any rank's bad loss counts for all.
        finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            self.consecutive = 0
            return
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            trainer.should_stop = True
            msg = f"stopping: {self.consecutive} consecutive non-finite losses (step {trainer.global_step})"
            pl_module.print(msg)
            raise FloatingPointError(msg)

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "total_bad_grads": self.total_bad_grads}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive = int(state.get("consecutive", 0))
        self.total_bad_grads = int(state.get("total_bad_grads", 0))


class Throughput(Callback):
    """Logs training samples per second (this rank x world size)."""

    def __init__(self, window: int = 20):
        self.window = window
        self._t0 = None
        self._n = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._n += int(batch["synthetic"].shape[0]) if "synthetic" in batch else 0
        if self._n and (batch_idx + 1) % self.window == 0:
            dt = time.perf_counter() - self._t0
            pl_module.log("train/samples_per_s", self._n * trainer.world_size / max(dt, 1e-9))
            self._t0, self._n = time.perf_counter(), 0


def save_png_atomic(array: np.ndarray, path: Path) -> Path:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path


def make_grid(images: np.ndarray, nrow: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows*H, nrow*W, 3) grid (missing cells black)."""
    n, h, w, c = images.shape
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * h, nrow * w, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = images[i]
    return grid


class TestbedImageLogger(Callback):
    """Periodic EMA samples of the prompt testbed, saved as a grid and scored when cheap."""

    __test__ = False  # not a pytest class

    def __init__(self, prompts: list[str], out_dir: str, every_n_steps: int = 5000, num_steps: int = 20,
                 guidance_scale: float = 7.0, seed: int = 3407, max_prompts: int = 16,
                 text_embeddings: list[np.ndarray] | None = None, score_rewards: list[str] | None = None,
                 ema_index: int | None = 0):
        if not prompts:
            raise ValueError("the image logger needs at least one testbed prompt")
        self.prompts = list(prompts)[:max_prompts]
        self.text_embeddings = text_embeddings[: len(self.prompts)] if text_embeddings else None
        self.out_dir = Path(out_dir)
        self.every_n_steps, self.num_steps = int(every_n_steps), int(num_steps)
        self.guidance_scale, self.seed = float(guidance_scale), int(seed)
        self.score_rewards = list(score_rewards or [])
        self.ema_index = ema_index  # None: the raw training weights (informative before the EMA warms up)
        self._last = -1

    def _text(self, pl_module):
        if self.text_embeddings is not None:
            from miro.encoders.text import pad_token_rows

            emb, mask = pad_token_rows(self.text_embeddings)
            return emb.to(pl_module.device), mask.to(pl_module.device)
        emb, mask = pl_module.text_encoder().encode(self.prompts)
        return emb.to(pl_module.device).float(), mask.to(pl_module.device).bool()

    @torch.no_grad()
    def generate(self, pl_module) -> np.ndarray:
        """uint8 (N, H, W, 3) images of the testbed from the EMA model."""
        from miro.encoders import load_autoencoder, to_uint8
        from miro.models import euler_sample

        model = pl_module.model if self.ema_index is None else pl_module.ema_model(self.ema_index)
        emb, mask = self._text(pl_module)
        u = pl_module.uncond_embedding
        g = torch.Generator().manual_seed(self.seed)
        c, s, _ = model.latent_shape
        noise = torch.randn(len(self.prompts), c, s, s, generator=g).to(pl_module.device)
        x0 = euler_sample(model, noise, emb, mask, u, torch.ones(u.shape[0], dtype=torch.bool, device=u.device),
                          num_steps=self.num_steps, guidance_scale=self.guidance_scale, autocast=False)
        codec = load_autoencoder(pl_module.hparams["model_config"].get("autoencoder", "identity"),
                                 device=pl_module.device)
        return to_uint8(codec.decode(model.postprocess(x0)))

    def _score(self, images: np.ndarray) -> dict[str, float]:
        if not self.score_rewards:
            return {}
        from PIL import Image

        from miro.rewards import load_scorer

        pil = [Image.fromarray(im) for im in images]
        out = {}
        for key in self.score_rewards:
            try:
                out[key] = float(load_scorer(key).score(pil, self.prompts).float().mean())
            except Exception as e:  # scoring is a diagnostic: never stop training for it
                out[key] = math.nan
                print(f"testbed scoring with {key} failed: {e}")
        return out

    def log_now(self, trainer, pl_module) -> Path | None:
        step = trainer.global_step
        images = self.generate(pl_module)
        grid = make_grid(images, nrow=int(math.ceil(math.sqrt(len(images)))))
        path = save_png_atomic(grid, self.out_dir / f"step_{step:08d}.png")
        scores = {f"testbed/{k}": v for k, v in self._score(images).items()}
        if scores and trainer.logger is not None:
            # straight to the logger: independent of log_every_n_steps, and rank 0 only
            trainer.logger.log_metrics(scores, step=step)
        exp = getattr(trainer.logger, "experiment", None) if trainer.logger is not None else None
        if exp is not None and hasattr(exp, "add_image"):  # TensorBoard
            exp.add_image("testbed", grid, step, dataformats="HWC")
        elif trainer.logger is not None and hasattr(trainer.logger, "log_image"):  # W&B and others
            trainer.logger.log_image(key="testbed", images=[grid], step=step)
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last or step == 0 or step % self.every_n_steps:
            return
        self._last = step
        if trainer.is_global_zero:
            self.log_now(trainer, pl_module)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the target folder, then renames it.

    Lightning's own local save stages the file in the system temp folder and moves it, which is a
    non-atomic copy when that folder is on another file system (node-local /tmp vs a shared
    checkpoint disk); a kill mid-copy would leave a truncated ``last.ckpt``.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also saves at the step where training stops.

    Lightning's own ``on_train_end`` writes ``last.ckpt`` only when none was written yet (Lightning
    2.6, ``ModelCheckpoint.on_train_end``), so a run stopped by ``max_time``, or by a ``max_steps``
    that is not a multiple of ``every_n_train_steps``, kept the last periodic state and lost up to
    ``every_n_train_steps - 1`` steps.
    """

    def on_train_end(self, trainer, pl_module) -> None:
        if self._should_skip_saving_checkpoint(trainer):  # no fit, or this step is already saved
            return super().on_train_end(trainer, pl_module)
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)


def checkpoint_callback(dirpath: str, every_n_steps: int, keep_periodic: bool = True) -> ModelCheckpoint:
    """``last.ckpt`` refreshed every ``every_n_steps`` steps and when training stops, plus
    ``step=<k>.ckpt`` snapshots."""
    return StepCheckpoint(dirpath=dirpath, filename="step={step}", auto_insert_metric_name=False,
                           every_n_train_steps=int(every_n_steps), save_last=True,
                           save_top_k=-1 if keep_periodic else 0, enable_version_counter=False)
