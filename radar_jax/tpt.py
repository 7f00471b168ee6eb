"""Tokenizer post-training (TPT): the decoder fine-tuned on the generator's own token maps.

The generator's token maps are not the encoder's: its mistakes put codes next to each other
that the decoder never saw in tokenizer training. TPT (RadAR's fourth contribution, our reading
in docs/tpt.md) fine-tunes the decoder on maps that contain such mistakes:

  real images -> frozen encoder -> ground-truth codes (B, h, w)
              -> the trained generator, teacher-forced over them in one forward (the full
                 packed layout of its trained schedule): its prediction at every grid position,
                 taken from the last block that holds the position (the final canvas's
                 prediction), argmax or sampled (`tpt.prediction`)
              -> each token replaced by that prediction with probability `tpt.mix_ratio`
              -> decoder (post_quant_conv + decoder, trained) -> images, paired with the real
                 images, so the decoder learns to draw what the encoder saw.
Losses: train_vq's L2 (+ LPIPS with a weights file) + PatchGAN (a fresh discriminator, trained
from step 1; the generator-side term after `tpt.disc_start` steps) + `tpt.semantic_weight` x
(1 - cos(MLP(decoder features at `tpt.feature_level`, resized to the DINOv2 grid), DINOv2
patch features of the real image)). Without a DINOv2 file the semantic term is off (one logged
notice). The encoder, quant_conv and codebook are not in the train state at all (they are a
constant input of the step), so they are bit-unchanged and the generator's codes keep their
meaning; the generator is frozen too.

`train_and_evaluate(config, wd)` runs (or resumes) the stage into wd.stage('tokenizer_tpt'):

  setup -> data -> model -> shard -> update step -> checkpoint -> loop -> export + eval

It writes checkpoints/ (Orbax, with the data iterator), metrics.jsonl, params/ (the full
tokenizer params with the new decoder: every decode works unchanged), projector/ (the MLP, when
the semantic term is on), reconstructions.png and eval.json.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from radar_jax import checkpoint as ckpt_lib
from radar_jax import data as data_lib
from radar_jax import fileio
from radar_jax import reporting
from radar_jax import schedules
from radar_jax import sharding
from radar_jax import train_step as ts
from radar_jax import train_vq
from radar_jax import trainer
from radar_jax import workdir as workdir_lib
from radar_jax.models import discriminator as disc_lib
from radar_jax.models import dinov2 as dinov2_lib
from radar_jax.models import transformer
from radar_jax.models import vq as vq_lib

PREDICTIONS = ("argmax", "sample")
# The tokenizer params post-training trains; every other top-level entry (encoder, quant_conv,
# quantize = the codebook) is frozen.
TRAINABLE = ("post_quant_conv", "decoder")


@flax.struct.dataclass
class TPTState:
    """What a post-training run checkpoints: params = dict(vq=the TRAINABLE tokenizer params,
    projector=the projector MLP's params or {} without the semantic term)."""
    step: jax.Array
    params: Any
    opt_state: Any
    disc_params: Any
    disc_batch_stats: Any
    disc_opt_state: Any


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the bad `config.tpt` field and its fix."""
    t = config.tpt
    if t.prediction not in PREDICTIONS:
        raise ValueError(f"config.tpt.prediction={t.prediction!r}: use one of "
                         f"{', '.join(PREDICTIONS)}.")
    checks = (("mix_ratio", 0.0 <= t.mix_ratio <= 1.0, "use a fraction in [0, 1]"),
              ("temperature", t.temperature > 0, "use a temperature > 0"),
              ("num_steps", t.num_steps >= 1, "use at least 1 step"),
              ("batch_size", t.batch_size >= 1, "use a batch of at least 1 image"),
              ("semantic_weight", t.semantic_weight >= 0, "use a weight >= 0 (0 = off)"),
              ("feature_level", 0 <= t.feature_level < len(config.tokenizer.model.decoder_ch_mult),
               f"use a decoder level in [0, {len(config.tokenizer.model.decoder_ch_mult)})"),
              ("dino_image_size", t.dino_image_size % 14 == 0 and t.dino_image_size > 0,
               "use a multiple of DINOv2's 14-pixel patch, e.g. 224"))
    for name, ok, fix in checks:
        if not ok:
            raise ValueError(f"config.tpt.{name}={t[name]!r}: {fix}.")
    if t.dinov2_path and not fileio.path(t.dinov2_path).exists():
        raise ValueError(f"config.tpt.dinov2_path={t.dinov2_path!r} does not exist: pass the "
                         "facebook/dinov2-base model.safetensors (with its config.json) or "
                         "dinov2_vitb14_pretrain.pth you downloaded, or '' for no semantic term.")


# ---------------------------------------------------------------- pieces (tested one by one)
def split_tokenizer_params(params: dict) -> tuple[dict, dict]:
    """Tokenizer params -> (trainable: post_quant_conv + decoder, frozen: everything else)."""
    trainable = {k: v for k, v in params.items() if k in TRAINABLE}
    frozen = {k: v for k, v in params.items() if k not in TRAINABLE}
    return trainable, frozen


def merge_tokenizer_params(frozen: dict, trainable: dict) -> dict:
    """The inverse of `split_tokenizer_params`: full tokenizer params for VQModel."""
    return {**frozen, **trainable}


def final_canvas_index(meta: dict[str, np.ndarray], grid: tuple[int, int]) -> np.ndarray:
    """(H*W,) int32: for each flat grid position, the packed-sequence index of its prediction
    on the final canvas, i.e. the LAST valid index whose target is that position (the last
    block holding it; for 'raster', the one index predicting it)."""
    target = np.asarray(meta["target_pos"])
    valid = np.asarray(meta.get("valid", np.ones(target.shape, bool)))
    index = np.full((grid[0] * grid[1],), -1, np.int64)
    for i in np.flatnonzero(valid & (target >= 0)):
        index[target[i]] = i  # later blocks overwrite earlier ones
    if (index < 0).any():
        raise ValueError(f"the layout predicts no token at flat positions "
                         f"{np.flatnonzero(index < 0)[:8].tolist()}: it does not cover the grid.")
    return index.astype(np.int32)


def generator_predictions(model: transformer.Transformer, params, meta, canvas_index,
                          codes_BHW, labels_B, rng, *, prediction: str = "argmax",
                          temperature: float = 1.0):
    """The generator's token at every position, teacher-forced on the true codes.

    Args:
      model, params: the trained generator (frozen; no dropout).
      meta: the full (L,) layout (`train_step.LayoutSampler(...).full`).
      canvas_index: (H*W,) int32 from `final_canvas_index(meta, grid)`.
      codes_BHW: (B, H, W) int32 ground-truth codes; labels_B: (B,) int32 class ids.
      rng: key for 'sample'.
    Returns:
      (B, H, W) int32 predictions.
    """
    b, h, w = codes_BHW.shape
    codes_BN = codes_BHW.reshape(b, h * w)
    flat_pos_BL = jnp.broadcast_to(jnp.maximum(meta["flat_pos"], 0), (b, meta["flat_pos"].size))
    tokens_BL = jnp.take_along_axis(codes_BN, flat_pos_BL, axis=1)
    mask_LL = schedules.nested_mask(meta["step"], meta["is_new"], meta["is_class"],
                                    meta["valid"], xp=jnp)
    logits_BLV, _ = model.apply({"params": params}, tokens_BL, labels_B, meta["flat_pos"],
                                meta["is_new"], meta["is_class"], mask_LL, train=False)
    logits_BNV = jnp.take(logits_BLV, canvas_index, axis=1).astype(jnp.float32)
    if prediction == "argmax":
        pred_BN = jnp.argmax(logits_BNV, axis=-1)
    else:
        pred_BN = jax.random.categorical(rng, logits_BNV / temperature, axis=-1)
    return pred_BN.astype(jnp.int32).reshape(b, h, w)


def mix_tokens(codes_BHW, pred_BHW, mix_ratio: float, rng):
    """Each token independently: the prediction with probability mix_ratio, else the true code.
    (B, H, W) int32 -> (B, H, W) int32."""
    take = jax.random.uniform(rng, codes_BHW.shape) < mix_ratio
    return jnp.where(take, pred_BHW, codes_BHW)


class Projector(nn.Module):
    """The semantic head: a 3-layer MLP (SiLU) applied per position, (..., C) -> (..., features),
    REPA's projector shape. Trained with the decoder, discarded for decoding."""
    hidden: int
    features: int

    @nn.compact
    def __call__(self, x):
        x = nn.silu(nn.Dense(self.hidden, name="fc1")(x))
        x = nn.silu(nn.Dense(self.hidden, name="fc2")(x))
        return nn.Dense(self.features, name="fc3")(x)


def dino_targets(dino: dinov2_lib.DINOv2, dino_params, images_BHWC, size: int):
    """DINOv2 patch tokens of the real images resized to size x size: (B, size/p, size/p, D)
    float32, without gradient (DINOv2 is a frozen teacher)."""
    b, _, _, c = images_BHWC.shape
    x = jax.image.resize(images_BHWC, (b, size, size, c), "bicubic")
    return jax.lax.stop_gradient(dino.apply({"params": dino_params}, x)["patch_tokens"])


def semantic_loss(projector: Projector, projector_params, features_BhwC, targets_BgwD):
    """mean over batch and grid of 1 - cos(projector(features resized to the target grid),
    targets). features (B, h, w, C), targets (B, gh, gw, D); a float32 scalar in [0, 2]."""
    b, gh, gw, _ = targets_BgwD.shape
    f_BgwC = jax.image.resize(features_BhwC, (b, gh, gw, features_BhwC.shape[-1]), "bilinear")
    z_BgwD = projector.apply({"params": projector_params}, f_BgwC)
    cos = jnp.sum(vq_lib.l2_normalize(z_BgwD) * vq_lib.l2_normalize(targets_BgwD), axis=-1)
    return jnp.mean(1.0 - cos)


def _dino_setup(t, dinov2):
    """(DINOv2 module, params, width) or None when the semantic term is off."""
    if not t.semantic_weight:
        return None
    if dinov2 is None:
        if not t.dinov2_path:
            logging.warning(
                "Semantic regulariser off: config.tpt.dinov2_path is empty. RadAR's TPT aligns "
                "decoder features to DINOv2-B patch features; pass --config.tpt.dinov2_path="
                "/path/to/dinov2-base/model.safetensors (or dinov2_vitb14_pretrain.pth) to turn "
                "it on.")
            return None
        from radar_jax import convert  # pylint: disable=g-import-not-at-top
        dinov2 = convert.load_dinov2(t.dinov2_path)
    dino_config, dino_params = dinov2
    hp = dinov2_lib.resolve_dinov2_config(dino_config)
    if t.dino_image_size % hp.patch_size:
        raise ValueError(f"config.tpt.dino_image_size={t.dino_image_size} is not a multiple of "
                         f"the DINOv2 patch size {hp.patch_size}.")
    return dinov2_lib.DINOv2(dino_config), jax.tree.map(jnp.asarray, dino_params), hp.hidden_size


def train_and_evaluate(config: ml_collections.ConfigDict, wd: workdir_lib.Workdir, *,
                       dinov2: tuple[Any, Any] | None = None) -> dict[str, float]:
    """Post-trains the tokenizer of `wd` (finished tokenizer and generator stages needed);
    returns the held-out reconstruction metrics of the post-trained tokenizer.

    `dinov2`: (config, params) of a DINOv2 to use instead of loading `config.tpt.dinov2_path`
    (tests pass a small random one).
    """
    t, vq = config.tpt, config.tokenizer
    check_config(config)
    # ---------------------------------------------------------------- setup
    out = wd.stage(workdir_lib.TOKENIZER_TPT)
    out.mkdir(parents=True, exist_ok=True)
    writer = reporting.create_writer(out)
    mesh = sharding.make_mesh(config.get("mesh"))
    sharding.check_batch_divisible(t.batch_size, mesh)
    replicated = sharding.replicated(mesh)
    # Separate streams for the initial weights and the per-step draws (predictions, mixing,
    # dropout); fold_in(step) makes a resumed run draw the same numbers.
    init_rng, rng = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 0x79f))

    # ---------------------------------------------------------------- data
    # Real images (and their labels, which condition the generator), read with the tokenizer's
    # own pipeline; their ground-truth codes are encoded in the step, so pairs are exact.
    train_iter = iter(data_lib.make_image_dataset(
        vq.data, vq.data.train_split, t.batch_size // jax.process_count(), seed=config.seed,
        train=True, shard_index=jax.process_index(), shard_count=jax.process_count()))

    # ---------------------------------------------------------------- model
    vq_model = vq_lib.VQModel(vq.model)
    # Host copies: on several hosts, arrays on one host's device cannot seed global ones.
    trainable0, frozen = split_tokenizer_params(jax.device_get(wd.params(workdir_lib.TOKENIZER)))
    gen_model = transformer.Transformer(config.model)
    schedule, _ = wd.trained_schedule()
    # The full layout the generator trained on (RDS, if any, only shortened it).
    meta = ts.LayoutSampler(schedule, config.train, config.model.cls_token_num).full
    canvas_index = final_canvas_index(meta, schedule.grid)
    disc = disc_lib.PatchGANDiscriminator(ndf=vq.loss.disc_ndf, n_layers=vq.loss.disc_layers)
    use_gan = bool(vq.loss.disc_weight)
    perceptual = train_vq.perceptual_setup(vq.loss)
    dino = _dino_setup(t, dinov2)
    projector = Projector(t.projector_hidden, dino[2]) if dino else None
    tx = trainer.make_optimizer(t, t.num_steps)
    disc_tx = trainer.make_optimizer(t, t.num_steps)
    size = vq.data.image_size
    dummy = jnp.zeros((1, size, size, 3), jnp.float32)
    logging.info("TPT: mix ratio %.2f of %s generator tokens, schedule %s, semantic term %s.",
                 t.mix_ratio, t.prediction, schedule.kind, "on" if dino else "off")

    # Shapes and logical axes of the decoder, without compiling a random init: the tokenizer's
    # trained decoder fills them in (zeros are placeholders only).
    vq_abstract = jax.eval_shape(vq_model.init, init_rng, dummy)["params"]
    codes_abstract = jax.ShapeDtypeStruct((1,) + tuple(schedule.grid), jnp.int32)
    feats_abstract = jax.eval_shape(
        lambda p, c: vq_model.apply({"params": p}, c, method="decode_codes_with_features"),
        nn.meta.unbox(vq_abstract), codes_abstract)[1][t.feature_level]

    def init_state(rng):
        rng_proj, rng_disc = jax.random.split(rng)
        vq_zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                                {k: vq_abstract[k] for k in TRAINABLE})
        feats = jnp.zeros(feats_abstract.shape, feats_abstract.dtype)
        params = dict(vq=vq_zeros,
                      projector=projector.init(rng_proj, feats)["params"] if projector else {})
        disc_vars = disc.init(rng_disc, dummy)
        return TPTState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                        disc_params=disc_vars["params"],
                        disc_batch_stats=disc_vars.get("batch_stats", {}),
                        disc_opt_state=disc_tx.init(disc_vars["params"]))

    # ---------------------------------------------------------------- shard
    state, state_shardings = trainer.create_sharded_state(
        init_state, init_rng, mesh, sharding.rules_from_config(config))
    # The frozen inputs of every step: replicated (the generator does not train here).
    # Through host memory: the loaded params live on this host's first device, and a
    # replicated array over several hosts is built from each host's own copy.
    consts = jax.device_put(jax.device_get(dict(
        frozen=frozen, generator=wd.params(workdir_lib.GENERATOR), dino=dino[1] if dino else {},
        meta={k: np.asarray(v) for k, v in meta.items()})), replicated)
    consts_shardings = jax.tree.map(lambda _: replicated, consts)

    # ---------------------------------------------------------------- update step
    def loss_fn(params, state, consts, images, codes, rng):
        full = merge_tokenizer_params(consts["frozen"], params["vq"])
        recon, features = vq_model.apply({"params": full}, codes, train=True,
                                         method="decode_codes_with_features",
                                         rngs={"dropout": rng})
        loss, metrics = train_vq.pixel_losses(vq.loss, perceptual, recon, images)
        if use_gan:
            g_adv = train_vq.adversarial_loss(disc, vq.loss, state.disc_params,
                                              state.disc_batch_stats, recon)
            # state.step is the number of finished steps: this is step state.step + 1.
            on = (state.step >= t.disc_start).astype(jnp.float32)
            loss += on * vq.loss.disc_weight * g_adv
            metrics["g_adv_loss"] = g_adv
        if dino:
            targets = dino_targets(dino[0], consts["dino"], images, t.dino_image_size)
            sem = semantic_loss(projector, params["projector"], features[t.feature_level],
                                targets)
            loss += t.semantic_weight * sem
            metrics["semantic_loss"] = sem
        metrics["loss"] = loss
        return loss, (recon, metrics)

    @functools.partial(jax.jit, donate_argnums=0,
                       in_shardings=(state_shardings, consts_shardings,
                                     sharding.batch_sharding(mesh, 4),
                                     sharding.batch_sharding(mesh, 1)),
                       out_shardings=(state_shardings, None))
    def train_step(state, consts, images, labels):
        rng_pred, rng_mix, rng_drop = jax.random.split(jax.random.fold_in(rng, state.step), 3)
        full = merge_tokenizer_params(consts["frozen"], state.params["vq"])
        codes = vq_model.apply({"params": full}, images, method="encode")
        pred = generator_predictions(gen_model, consts["generator"], consts["meta"],
                                     canvas_index, codes, labels, rng_pred,
                                     prediction=t.prediction, temperature=t.temperature)
        mixed = mix_tokens(codes, pred, t.mix_ratio, rng_mix)
        (_, (recon, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state, consts, images, mixed, rng_drop)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics.update(grad_norm=optax.tree.norm(grads),
                       generator_accuracy=jnp.mean(pred == codes),
                       tokens_changed=jnp.mean(mixed != codes))
        disc_params, batch_stats, disc_opt_state = (state.disc_params, state.disc_batch_stats,
                                                    state.disc_opt_state)
        if use_gan:
            disc_params, batch_stats, disc_opt_state, d_metrics = train_vq.discriminator_update(
                disc, disc_tx, vq.loss, disc_params, batch_stats, disc_opt_state, images, recon)
            metrics.update(d_metrics)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             disc_params=disc_params, disc_batch_stats=batch_stats,
                             disc_opt_state=disc_opt_state), metrics

    # ---------------------------------------------------------------- checkpoint
    ckpt = ckpt_lib.Checkpointer(out / "checkpoints", keep=t.keep_checkpoints)
    state, resumed = ckpt.restore(state, train_iter)
    if resumed is None:  # start from the tokenizer's trained decoder
        state = state.replace(params=dict(
            vq=jax.device_put(trainable0, state_shardings.params["vq"]),
            projector=state.params["projector"]))
    start = int(state.step)

    # ---------------------------------------------------------------- loop
    progress = reporting.Progress("tokenizer post-training", t.num_steps, start,
                                  every=t.log_every)
    # closing(ckpt): an interrupt soon after a save must not abandon the write in flight.
    with contextlib.closing(ckpt):
        for step in range(start + 1, t.num_steps + 1):
            batch = next(train_iter)
            images, labels = sharding.shard_batch((batch["image"], batch["label"]), mesh)
            state, step_metrics = train_step(state, consts, images, labels)
            if step % t.log_every == 0 or step == t.num_steps:
                step_metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                writer.write_scalars(step, {f"train/{k}": v for k, v in step_metrics.items()})
                progress.update(step, loss=step_metrics["loss"], rec=step_metrics["rec_loss"])
            else:
                progress.update(step)
            if step % t.ckpt_every == 0 or step == t.num_steps:
                ckpt.save(step, state, train_iter)
    progress.close()

    # ---------------------------------------------------------------- export + eval
    # Global arrays only (the replicated frozen part, the sharded trained part), so every
    # process takes part in the collective Orbax write.
    params = merge_tokenizer_params(consts["frozen"], state.params["vq"])
    ckpt_lib.export_params(out / "params", params)
    if projector:
        ckpt_lib.export_params(out / "projector", state.params["projector"])
    # Held-out reconstructions (true codes) with the new decoder: TPT must not break them.
    metrics, grid = train_vq.TokenizerEvaluator(vq, vq_model, mesh)(params)
    writer.write_scalars(t.num_steps, {f"eval/{k}": v for k, v in metrics.items()})
    if wd.is_primary:
        reporting.save_png(out / "reconstructions.png", grid, scale=4)
        fileio.write_json(out / "eval.json", dict(step=t.num_steps, **metrics))
    logging.info("TPT eval: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    writer.close()
    return metrics
