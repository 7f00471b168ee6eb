"""The main job: every stage of a config, run, resumed, or skipped when finished, in order.

  tokenizer   train (or convert) the tokenizer              radar_jax/train_vq.py
  tokens      encode the training split once               radar_jax/encode.py
  generator   train RadAR on the token cache               radar_jax/train.py
  tokenizer_tpt  post-train the decoder (config.tpt.enabled)  radar_jax/tpt.py
  samples     sample PNG grid + growth GIF, then quality   radar_jax/samples.py, quality.py

A config runs the stages it has sections for (`stages_of`): a tokenizer-only config (just
`tokenizer`) runs the first; a full config all four. The workdir layout, the "finished" records
and the loading of a finished stage belong to radar_jax/workdir.py; this module only decides
what runs. Each stage resumes from its own checkpoints, so re-running a killed job continues
where it stopped, and a finished stage is skipped (`--mode=<stage>` runs one stage regardless).
"""

from __future__ import annotations

import logging
import time

import jax
import ml_collections

from radar_jax import checkpoint as ckpt_lib
from radar_jax import config_defaults as cd
from radar_jax import config_io
from radar_jax import data as data_lib
from radar_jax import validate
from radar_jax import workdir as workdir_lib

MODES = ("all", "train_vq", "cache_tokens", "train", "post_train_vq", "sample", "eval",
         "edit")
_GENERATOR_SECTIONS = ("tokens", "model", "schedule", "train", "sample")


def stages_of(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The stages a config defines: the tokenizer, plus everything after it when the config
    has the generator's sections."""
    if "tokenizer" not in config:
        raise config_io.ConfigError("the config has no `tokenizer` section: every config "
                                    "defines the tokenizer it uses (see configs/demo_vq.py).")
    present = [name for name in _GENERATOR_SECTIONS if name in config]
    if not present:
        return (workdir_lib.TOKENIZER,)
    missing = [name for name in _GENERATOR_SECTIONS if name not in config]
    if missing:
        raise config_io.ConfigError(f"the config has {present} but not {missing}: a generator "
                                    "config needs tokens, model, schedule, train and sample.")
    # Tokenizer post-training is a stage only when the config turns it on.
    return tuple(s for s in workdir_lib.STAGES
                 if s != workdir_lib.TOKENIZER_TPT or _tpt_on(config))


def _tpt_on(config) -> bool:
    return "tpt" in config and bool(config.tpt.enabled)


def _check_before_work(config, stages, mode):
    """What can be known to fail is reported before any stage compiles or trains anything."""
    if mode not in MODES:
        raise config_io.ConfigError(f"--mode={mode!r}: choose one of {', '.join(MODES)}.")
    if mode not in ("all", "train_vq") and len(stages) == 1:
        raise config_io.ConfigError(f"--mode={mode} needs a generator config (e.g. "
                                    "configs/demo.py); this config only defines a tokenizer "
                                    "(use --mode=train_vq).")
    validate.check_config(config, stages)
    if mode == "post_train_vq" and "tpt" not in config:
        raise config_io.ConfigError("--mode=post_train_vq needs a `tpt` section in the config "
                                    "(config_defaults.tpt(); configs/demo.py has one).")
    if mode == "post_train_vq" or _tpt_on(config):
        from radar_jax import tpt  # pylint: disable=g-import-not-at-top
        try:
            tpt.check_config(config)
        except ValueError as e:
            raise config_io.ConfigError(str(e)) from None
    vq = config.tokenizer
    # Missing data is the most common first-run failure: say how to get it, with no trace.
    data_lib.check_data_available(vq.data)
    if not vq.num_steps and not vq.init_from:
        raise config_io.ConfigError(
            "config.tokenizer.num_steps=0 and no init_from: pass the LlamaGen VQ-16 checkpoint "
            "you downloaded, e.g. --config.tokenizer.init_from=/path/to/vq_ds16_c2i.pt (or "
            "train one with --config.tokenizer.num_steps=N).")
    if len(stages) > 1:
        # Building the schedule validates it (kind, sizes, steps) in milliseconds.
        try:
            cd.schedule_from_config(config.schedule, config.model.grid)
        except ValueError as e:
            raise config_io.ConfigError(f"config.schedule: {e}") from None


def _convert_ready_stages(config, wd: workdir_lib.Workdir) -> None:
    """Pretrained weights as a ready model: before sampling a workdir whose stages never ran, a
    tokenizer with num_steps=0 and init_from (LlamaGen's VQ-16) and a generator with
    train.init_from (LlamaGen's c2i GPT) and no checkpoint are converted and exported, so
    `--mode=sample` / `--mode=eval` need no training (docs/evaluate.md)."""
    vq = config.tokenizer
    if not vq.num_steps and vq.init_from and not wd.is_finished(workdir_lib.TOKENIZER):
        from radar_jax import train_vq  # pylint: disable=g-import-not-at-top
        metrics = train_vq.train_and_evaluate(vq, str(wd.stage(workdir_lib.TOKENIZER)))
        wd.mark_finished(workdir_lib.TOKENIZER, 0, metrics=metrics)
    init = config.train.get("init_from")
    if init and not wd.is_finished(workdir_lib.GENERATOR) and ckpt_lib.latest_step(
            wd.checkpoints_path(workdir_lib.GENERATOR)) is None:
        from radar_jax import train  # pylint: disable=g-import-not-at-top
        schedule = cd.schedule_from_config(config.schedule, config.model.grid)
        if not schedule.is_next_token:
            logging.warning("Sampling LlamaGen's %s with the %s schedule: LlamaGen is a raster "
                            "(next-token) model; pass --config.schedule.kind=raster.", init,
                            schedule.kind)
        wd.save_schedule(schedule, cd.correction_band(config.schedule.correction_band))
        train.export_init_from(config, wd.stage(workdir_lib.GENERATOR))
        wd.mark_finished(workdir_lib.GENERATOR, 0, init_from=str(init))


def _evaluate(config, wd: workdir_lib.Workdir) -> None:
    """The eval stage: the digits table on the digits; ADM's metrics elsewhere, when the
    Inception weights are given."""
    if config.tokenizer.data.source == "digits":
        if not wd.is_primary:  # a few hundred digits: one host measures them
            return
        from radar_jax import quality  # pylint: disable=g-import-not-at-top
        table = quality.evaluate(config, wd)
        if table:
            print(quality.format_table(table), flush=True)
    elif "eval" in config and config.eval.inception_path:
        from radar_jax import imagenet_eval  # pylint: disable=g-import-not-at-top
        table = imagenet_eval.evaluate(config, wd)
        if table and table[0]:
            print(imagenet_eval.format_table(table), flush=True)
    else:
        logging.info("Eval skipped: FID / IS on %s data need the Inception weights; pass "
                     "--config.eval.inception_path=weights-inception-2015-12-05-6726825d.pth "
                     "and --config.eval.reference (docs/evaluate.md).",
                     config.tokenizer.data.source)


def run(config: ml_collections.ConfigDict, workdir, mode: str = "all"):
    """Runs `mode` ('all' or one stage) of `config` in `workdir` (a local path or gs://)."""
    stages = stages_of(config)
    _check_before_work(config, stages, mode)
    validate.check_workdir_writable(workdir)
    wd = workdir_lib.Workdir(workdir)
    t0 = time.perf_counter()
    vq = config.tokenizer
    if mode == "train_vq" or (mode == "all" and not wd.is_finished(workdir_lib.TOKENIZER,
                                                                   vq.num_steps)):
        from radar_jax import train_vq  # pylint: disable=g-import-not-at-top
        metrics = train_vq.train_and_evaluate(vq, str(wd.stage(workdir_lib.TOKENIZER)))
        wd.mark_finished(workdir_lib.TOKENIZER, vq.num_steps, metrics=metrics)
        logging.info("Tokenizer: %s", {k: round(v, 4) for k, v in metrics.items()})
    elif mode == "all":
        logging.info("Tokenizer stage finished earlier (%s): skipping.",
                     wd.stage(workdir_lib.TOKENIZER))
    if len(stages) == 1:
        return
    if mode in ("all", "cache_tokens"):
        from radar_jax import encode  # pylint: disable=g-import-not-at-top
        encode.encode_dataset(config, wd)
    if mode == "train" or (mode == "all" and not wd.is_finished(workdir_lib.GENERATOR,
                                                                config.train.num_steps)):
        from radar_jax import train  # pylint: disable=g-import-not-at-top
        # The schedule is recorded before training starts, so a run killed mid-training
        # still says what its checkpoints were trained with.
        wd.save_schedule(cd.schedule_from_config(config.schedule, config.model.grid),
                         cd.correction_band(config.schedule.correction_band))
        metrics = train.train_and_evaluate(config, str(wd.stage(workdir_lib.GENERATOR)),
                                           str(wd.token_cache))
        wd.mark_finished(workdir_lib.GENERATOR, config.train.num_steps,
                         metrics={k: float(v) for k, v in metrics.items()})
    elif mode == "all":
        logging.info("Generator stage finished earlier: skipping.")
    if mode == "post_train_vq" or (mode == "all" and _tpt_on(config) and not wd.is_finished(
            workdir_lib.TOKENIZER_TPT, config.tpt.num_steps)):
        from radar_jax import tpt  # pylint: disable=g-import-not-at-top
        metrics = tpt.train_and_evaluate(config, wd)
        wd.mark_finished(workdir_lib.TOKENIZER_TPT, config.tpt.num_steps, metrics=metrics)
    elif mode == "all" and _tpt_on(config):
        logging.info("Tokenizer post-training finished earlier: skipping.")
    if mode in ("sample", "eval", "edit"):
        _convert_ready_stages(config, wd)
    if mode == "edit":  # zero-shot editing of config.edit.input (radar_jax/editing.py)
        from radar_jax import editing  # pylint: disable=g-import-not-at-top
        from radar_jax import generator  # pylint: disable=g-import-not-at-top
        editing.write_edit(config, wd, generator.Generator(config, wd.root))
    if mode in ("all", "sample", "eval") and jax.process_count() > 1:
        # Orbax restores are collective: every host loads the params that process 0 alone
        # samples and scores with below (each is loaded once; later calls reuse it).
        wd.params(workdir_lib.GENERATOR)
        wd.params(workdir_lib.TOKENIZER)
        wd.decoder_params()
    if mode in ("all", "sample") and wd.is_primary:
        # A preview grid and GIF: process-local sampling on one host is enough (the others
        # would only write the same files); the 50k-sample evaluation uses every host.
        from radar_jax import samples  # pylint: disable=g-import-not-at-top
        samples.write_samples(config, wd)
    if mode in ("all", "eval"):
        _evaluate(config, wd)
    # Process 0 alone draws the preview grid and the digits table: the other hosts wait here,
    # since a host that exits early fails jax.distributed's shutdown barrier for all of them.
    workdir_lib.barrier("radar_jax_pipeline_done")
    logging.info("Done in %.1f min. Outputs in %s", (time.perf_counter() - t0) / 60, workdir)
