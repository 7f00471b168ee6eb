"""Tokenizer training: LlamaGen's VQ recipe, in one readable function.

`train_and_evaluate(config, workdir)` runs (or resumes) a whole tokenizer training run:

  setup -> data -> model -> shard -> update step -> checkpoint -> evals -> loop

Losses (LlamaGen's VQLoss): L2 reconstruction + LPIPS perceptual + codebook (vq + commitment +
entropy) + PatchGAN adversarial loss after `loss.disc_start` steps (hinge by default). The
discriminator is updated in the same jitted step on the detached reconstructions. The pixel,
adversarial and discriminator pieces are functions (`perceptual_setup`, `pixel_losses`,
`adversarial_loss`, `discriminator_update`) that tokenizer post-training (radar_jax/tpt.py)
reuses.

Random-resolution fine-tuning (`config.random_resolutions`, e.g. (256, 320, 384)): each step
trains at a resolution drawn from the list by (seed, step) alone (`resolution_for_step`), so a
resumed run draws the same sizes. The data pipeline reads every batch at the largest size and
the step resizes it on the device (antialiased bilinear) to the drawn size: grain keeps one
fixed batch shape, and the step compiles once per resolution, with fixed shapes each.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from radar_jax import checkpoint as ckpt_lib
from radar_jax import config_io
from radar_jax import data as data_lib
from radar_jax import evaluation
from radar_jax import fileio
from radar_jax import preemption
from radar_jax import reporting
from radar_jax import sharding
from radar_jax import trainer
from radar_jax.models import discriminator as disc_lib
from radar_jax.models import lpips as lpips_lib
from radar_jax.models import vq as vq_lib


@flax.struct.dataclass
class VQTrainState:
    """Everything a tokenizer run checkpoints. `ema_params` is {} when EMA is off."""
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    disc_params: Any
    disc_batch_stats: Any
    disc_opt_state: Any


def perceptual_setup(loss_config):
    """Returns (lpips_module, lpips_params, weight): weight 0 without a converted LPIPS file."""
    if loss_config.perceptual_weight and not loss_config.lpips_path:
        logging.warning(
            "Perceptual loss off: config.loss.lpips_path is empty. LlamaGen trains with LPIPS; "
            "convert the VGG16 + LPIPS weights once with launch/convert_lpips.py and pass "
            "--config.loss.lpips_path=FILE.npz to turn it on.")
        return None, None, 0.0
    if not loss_config.perceptual_weight:
        return None, None, 0.0
    return lpips_lib.LPIPS(), lpips_lib.load_lpips_params(loss_config.lpips_path), \
        float(loss_config.perceptual_weight)


def pixel_losses(loss_config, perceptual, recon, images):
    """reconstruction_weight * L2 (+ perceptual weight * LPIPS when `perceptual`, the triple of
    `perceptual_setup`, has a weight) of recon vs images, both (B, H, W, 3) in [-1, 1].
    Returns (loss float32 scalar, metrics dict with rec_loss [and perceptual_loss])."""
    lpips_model, lpips_params, perceptual_weight = perceptual
    rec_loss = jnp.mean(jnp.square(recon - images))
    loss = loss_config.reconstruction_weight * rec_loss
    metrics = dict(rec_loss=rec_loss)
    if perceptual_weight:
        p_loss = jnp.mean(lpips_model.apply({"params": lpips_params}, recon, images))
        loss += perceptual_weight * p_loss
        metrics["perceptual_loss"] = p_loss
    return loss, metrics


def adversarial_loss(disc, loss_config, disc_params, disc_batch_stats, recon):
    """The generator side of the PatchGAN loss (`loss.gen_loss`) on recon (B, H, W, 3): a
    float32 scalar (unweighted). The discriminator's batch statistics are not updated."""
    logits_fake, _ = disc.apply({"params": disc_params, "batch_stats": disc_batch_stats}, recon,
                                mutable=["batch_stats"])
    return disc_lib.get_g_loss(loss_config.gen_loss)(logits_fake)


def discriminator_update(disc, disc_tx, loss_config, disc_params, batch_stats, opt_state,
                         images, recon):
    """One discriminator step (`loss.disc_loss`) on real images and detached recon, both
    (B, H, W, 3). Returns (disc_params, batch_stats, opt_state, metrics: d_loss,
    logits_real, logits_fake)."""
    def d_loss_fn(disc_params, batch_stats):
        both = jnp.concatenate([images, jax.lax.stop_gradient(recon)], axis=0)
        logits, new_vars = disc.apply({"params": disc_params, "batch_stats": batch_stats},
                                      both, mutable=["batch_stats"])
        logits_real, logits_fake = jnp.split(logits, 2, axis=0)
        d_loss = disc_lib.get_d_loss(loss_config.disc_loss)(logits_real, logits_fake)
        return d_loss, (new_vars["batch_stats"], jnp.mean(logits_real), jnp.mean(logits_fake))

    (d_loss, (batch_stats, real, fake)), d_grads = jax.value_and_grad(
        d_loss_fn, has_aux=True)(disc_params, batch_stats)
    d_updates, opt_state = disc_tx.update(d_grads, opt_state, disc_params)
    disc_params = optax.apply_updates(disc_params, d_updates)
    return disc_params, batch_stats, opt_state, dict(d_loss=d_loss, logits_real=real,
                                                     logits_fake=fake)


def check_resolutions(config) -> tuple[int, ...]:
    """config.random_resolutions as a tuple of ints (() = off), each a positive multiple of
    the tokenizer's downsampling factor; raises ValueError naming the bad size and the fix."""
    sizes = tuple(int(r) for r in config.get("random_resolutions", ()) or ())
    f = vq_lib.resolve_vq_config(config.model).downsample
    bad = [r for r in sizes if r < f or r % f]
    if bad:
        raise ValueError(f"config.random_resolutions={sizes} has {bad}, not positive multiples of "
                         f"the tokenizer's downsampling factor {f}: use sizes like "
                         f"{tuple(f * k for k in (16, 20, 24))}.")
    return sizes


def resolution_for_step(resolutions: tuple[int, ...], seed: int, step: int) -> int:
    """The image side step `step` trains at: a uniform draw from `resolutions` that depends on
    (seed, step) only, so a resumed run trains each step at the same size."""
    rng = np.random.default_rng([seed, step])
    return int(resolutions[int(rng.integers(len(resolutions)))])


def resize_images(images, size: int):
    """(B, S, S', 3) -> (B, size, size, 3): antialiased bilinear (a no-op at the same size)."""
    if images.shape[1:3] == (size, size):
        return images
    return jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "bilinear",
                            antialias=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes) the tokenizer in `workdir`; returns the final eval metrics."""
    # ---------------------------------------------------------------- setup
    workdir = fileio.path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data_lib.check_data_available(config.data)
    writer = reporting.create_writer(workdir)
    mesh = sharding.make_mesh(config.get("mesh"))
    sharding.check_batch_divisible(config.batch_size, mesh)
    # Separate streams for the initial weights and for the per-step dropout draws.
    init_rng, rng = jax.random.split(jax.random.key(config.seed))
    logging.info("Tokenizer run in %s on %d device(s), mesh %s.", workdir, jax.device_count(),
                 dict(mesh.shape))

    resolutions = check_resolutions(config)
    if not config.num_steps and config.init_from:
        return _evaluate_init_from(config, workdir, mesh, writer, init_rng)

    # ---------------------------------------------------------------- data
    data_config = config.data
    if resolutions:  # read at the largest size; each step resizes on the device
        data_config = config.data.copy_and_resolve_references()
        data_config.image_size = max(resolutions)
        logging.info("Random-resolution training at %s (batches read at %d).", resolutions,
                     max(resolutions))
    train_ds = data_lib.make_image_dataset(
        data_config, data_config.train_split, config.batch_size // jax.process_count(),
        seed=config.seed, train=True, shard_index=jax.process_index(),
        shard_count=jax.process_count())
    train_iter = iter(train_ds)

    # ---------------------------------------------------------------- model
    model = vq_lib.VQModel(config.model)
    disc = disc_lib.PatchGANDiscriminator(ndf=config.loss.disc_ndf,
                                          n_layers=config.loss.disc_layers)
    perceptual = perceptual_setup(config.loss)
    # LlamaGen's tokenizer recipe: the same Adam for the generator and the discriminator, a
    # constant rate after warmup.
    tx = trainer.make_optimizer(config.optim, config.num_steps)
    disc_tx = trainer.make_optimizer(config.optim, config.num_steps)
    size = config.data.image_size
    dummy = jnp.zeros((1, size, size, 3), jnp.float32)

    def init_state(rng):
        rng_model, rng_disc = jax.random.split(rng)
        params = model.init(rng_model, dummy)["params"]
        disc_vars = disc.init(rng_disc, dummy)
        return VQTrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
            ema_params=params if config.ema_decay else {},
            disc_params=disc_vars["params"], disc_batch_stats=disc_vars.get("batch_stats", {}),
            disc_opt_state=disc_tx.init(disc_vars["params"]))

    # ---------------------------------------------------------------- shard
    state, state_shardings = trainer.create_sharded_state(
        init_state, init_rng, mesh, sharding.rules_from_config(config))
    data_sharding = sharding.batch_sharding(mesh, 4)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info("Tokenizer: %.2fM parameters.", num_params / 1e6)

    # ---------------------------------------------------------------- update step
    def g_loss_fn(params, state, images, rng, use_gan):
        recon, aux = model.apply({"params": params}, images, train=True,
                                 rngs={"dropout": rng})
        loss, metrics = pixel_losses(config.loss, perceptual, recon, images)
        codebook_loss = aux["vq_loss"] + aux["commit_loss"] + aux["entropy_loss"]
        loss += config.loss.codebook_weight * codebook_loss
        metrics.update(vq_loss=aux["vq_loss"], commit_loss=aux["commit_loss"],
                       entropy_loss=aux["entropy_loss"], codebook_usage=aux["codebook_usage"])
        if use_gan:
            g_adv = adversarial_loss(disc, config.loss, state.disc_params,
                                     state.disc_batch_stats, recon)
            loss += config.loss.disc_weight * g_adv
            metrics["g_adv_loss"] = g_adv
        metrics["loss"] = loss
        return loss, (recon, metrics)

    @functools.partial(jax.jit, static_argnums=(2, 3), donate_argnums=0,
                       in_shardings=(state_shardings, data_sharding),
                       out_shardings=(state_shardings, None))
    def train_step(state, images, use_gan, size):
        images = resize_images(images, size)
        step_rng = jax.random.fold_in(rng, state.step)
        (_, (recon, metrics)), grads = jax.value_and_grad(g_loss_fn, has_aux=True)(
            state.params, state, images, step_rng, use_gan)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        ema = trainer.ema_update(state.ema_params, params, config.ema_decay)
        disc_params, batch_stats, disc_opt_state = (state.disc_params, state.disc_batch_stats,
                                                    state.disc_opt_state)
        if use_gan:
            disc_params, batch_stats, disc_opt_state, d_metrics = discriminator_update(
                disc, disc_tx, config.loss, disc_params, batch_stats, disc_opt_state, images,
                recon)
            metrics.update(d_metrics)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             ema_params=ema, disc_params=disc_params,
                             disc_batch_stats=batch_stats,
                             disc_opt_state=disc_opt_state), metrics

    # ---------------------------------------------------------------- checkpoint
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints",
                                 keep=config.keep_checkpoints)
    try:
        state, resumed = ckpt.restore(state, train_iter)
    except ckpt_lib.CheckpointMismatchError as e:
        raise config_io.ConfigError(str(e)) from None
    if resumed is None and config.init_from:
        state = state.replace(params=_load_init(config, state_shardings.params))
        if config.ema_decay:
            state = state.replace(ema_params=state.params)
    start = int(state.step)

    # ---------------------------------------------------------------- evals
    evaluator = TokenizerEvaluator(config, model, mesh)

    def run_eval(step):
        return _record_eval(evaluator, state.ema_params if config.ema_decay else state.params,
                            step, writer, workdir)

    # ---------------------------------------------------------------- loop
    progress = reporting.Progress("tokenizer", config.num_steps, start, every=config.log_every)
    # closing(ckpt): an interrupt or error soon after a save must not abandon the asynchronous
    # write in flight; close() waits for it, so that checkpoint is kept.
    with contextlib.closing(ckpt), preemption.StopSignal() as stop:
        for step in range(start + 1, config.num_steps + 1):
            batch = next(train_iter)
            images = sharding.shard_batch(batch["image"], mesh)
            use_gan = step > config.loss.disc_start
            res = (resolution_for_step(resolutions, config.seed, step) if resolutions
                   else images.shape[1])
            state, step_metrics = train_step(state, images, use_gan, res)
            if step % config.log_every == 0 or step == config.num_steps:
                step_metrics = jax.device_get(step_metrics)
                step_metrics["resolution"] = res
                # Corrupt or unreadable images are skipped by the data pipeline; count them.
                step_metrics["skipped_images"] = data_lib.skipped_count(train_iter)
                writer.write_scalars(step, {f"train/{k}": v for k, v in step_metrics.items()})
                progress.update(step, loss=step_metrics["loss"], rec=step_metrics["rec_loss"])
            else:
                progress.update(step)
            stopping = stop.requested(step) and step < config.num_steps
            if stopping or step % config.ckpt_every == 0 or step == config.num_steps:
                ckpt.save(step, state, train_iter)
            if stopping:  # SIGTERM / Ctrl-C: the checkpoint is on disk, then stop
                ckpt.wait()
                raise preemption.Preempted(step, ckpt.directory)
            if step % config.eval_every == 0 and step != config.num_steps:
                run_eval(step)
    progress.close()
    metrics = run_eval(config.num_steps)
    # A params-only copy for the generator stages, sampling and the notebook.
    ckpt_lib.export_params(workdir / "params",
                           state.ema_params if config.ema_decay else state.params)
    writer.close()
    return metrics


def _record_eval(evaluator, params, step, writer, workdir) -> dict[str, float]:
    """Runs the held-out eval on `params`; writes its scalars, eval.json and the grid."""
    metrics, grid = evaluator(params)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
    writer.write_images(step, {"recon": grid})
    if jax.process_index() == 0:
        reporting.save_png(fileio.path(workdir) / "reconstructions.png", grid, scale=4)
        fileio.write_json(fileio.path(workdir) / "eval.json", dict(step=step, **metrics))
    logging.info("Tokenizer eval at step %d: %s", step,
                 ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics


def _evaluate_init_from(config, workdir, mesh, writer, rng) -> dict[str, float]:
    """num_steps=0 with init_from (a ready LlamaGen VQ): the converted weights are evaluated
    and exported as this run's params. No training state is built: no random init to compile
    (the longest compile of a small tokenizer run on CPU), no optimizer or discriminator."""
    model = vq_lib.VQModel(config.model)
    size = config.data.image_size
    dummy = jnp.zeros((1, size, size, 3), jnp.float32)
    abstract = jax.eval_shape(lambda r: model.init(r, dummy)["params"], rng)
    shardings = sharding.logical_to_shardings(abstract, mesh, sharding.rules_from_config(config))
    params = _load_init(config, shardings)
    metrics = _record_eval(TokenizerEvaluator(config, model, mesh), params, 0, writer, workdir)
    ckpt_lib.export_params(workdir / "params", params)
    writer.close()
    return metrics


def _load_init(config, params_shardings):
    """Params from a converted LlamaGen checkpoint, checked against this run's model config."""
    from radar_jax import convert  # pylint: disable=g-import-not-at-top
    loaded_config, loaded = convert.load_llamagen_vq(config.init_from, config=config.model)
    for key in ("codebook_size", "codebook_embed_dim", "z_channels", "ch"):
        if loaded_config[key] != config.model[key]:
            raise ValueError(
                f"config.init_from={config.init_from} has {key}={loaded_config[key]} but "
                f"config.model.{key}={config.model[key]}; use the matching config (e.g. "
                "configs/vq16.py for LlamaGen's VQ-16).")
    logging.info("Initialised the tokenizer from %s.", config.init_from)
    return jax.device_put(jax.tree.map(jnp.asarray, loaded), params_shardings)


class TokenizerEvaluator:
    """Held-out reconstruction metrics: PSNR, codebook usage/perplexity and, on the digits, the
    accuracy a digit classifier keeps on reconstructed held-out digits."""

    def __init__(self, config, model, mesh):
        self.config, self.model, self.mesh = config, model, mesh
        self.is_digits = config.data.source == "digits"
        if self.is_digits:
            self.classifier = evaluation.DigitClassifier()
            x8, y = data_lib.load_digits_split("eval")
            self.real_accuracy = self.classifier.accuracy(x8, y)

        @jax.jit
        def reconstruct(params, images):
            recon, aux = model.apply({"params": params}, images)
            return recon, aux["codes"]
        self._reconstruct = reconstruct

    def __call__(self, params) -> tuple[dict[str, float], np.ndarray]:
        config = self.config
        ds = data_lib.make_image_dataset(config.data, config.data.eval_split,
                                         config.eval_batch_size, seed=0, train=False,
                                         num_epochs=1, drop_remainder=False)
        originals, recons, codes, labels = [], [], [], []
        for i, batch in enumerate(ds):
            if config.eval_batches and i >= config.eval_batches:
                break
            recon, code = self._reconstruct(params, jnp.asarray(batch["image"]))
            originals.append(batch["image"])
            recons.append(np.asarray(recon))
            codes.append(np.asarray(code))
            labels.append(batch["label"])
        originals, recons = np.concatenate(originals), np.clip(np.concatenate(recons), -1, 1)
        codes, labels = np.concatenate(codes), np.concatenate(labels)
        metrics = dict(
            psnr=evaluation.psnr(recons, originals),
            codebook_usage=evaluation.codebook_usage(codes, config.model.codebook_size),
            codebook_perplexity=evaluation.codebook_perplexity(codes,
                                                               config.model.codebook_size))
        if self.is_digits:
            acc = self.classifier.accuracy(data_lib.images_to_digits(recons), labels)
            metrics.update(classifier_accuracy_real=self.real_accuracy,
                           classifier_accuracy_recon=acc,
                           classifier_accuracy_kept=acc / self.real_accuracy)
        n = config.eval_images
        grid = reporting.image_grid(reporting.to_uint8(np.concatenate(
            [originals[:n], recons[:n]])), ncol=n)
        return {k: float(v) for k, v in metrics.items()}, grid
