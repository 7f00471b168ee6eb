"""One check of the whole config at start-up, so bad input costs seconds, not hours.

`check_config(config, stages)` runs before any data is read, any model is built or anything is
compiled. It raises `config_io.ConfigError` with one line that names the field, the value and
the fix (main.py prints it and exits with status 2). The checks are the ones a typo, a wrong
sign or a forgotten unit can break: ranges, positive intervals, known kinds, a workdir that can
be written. Checks that need the files of a run (the token cache's metadata, a checkpoint's
shapes) happen where those files are opened, still before the first compile.
"""

from __future__ import annotations

import uuid

from radar_jax import config_io
from radar_jax import fileio

ConfigError = config_io.ConfigError

_SOURCES = ("digits", "imagefolder", "tfds")
_AUGMENTS = ("none", "flip", "tencrop")
_KINDS = ("euclidean", "crops", "raster", "custom")


def _fail(field: str, value, fix: str):
    raise ConfigError(f"config.{field}={value!r}: {fix}.")


def _positive(section, prefix: str, names, *, allow_zero=False):
    for name in names:
        if name not in section:
            continue
        value = section[name]
        if allow_zero and value < 0:
            _fail(f"{prefix}.{name}", value, "use a value >= 0")
        if not allow_zero and value <= 0:
            _fail(f"{prefix}.{name}", value, "use a value > 0")


def _check_optimizer(o, prefix: str):
    _positive(o, prefix, ("lr",))
    _positive(o, prefix, ("weight_decay", "grad_clip", "warmup_steps"), allow_zero=True)
    for name in ("beta1", "beta2"):
        if name in o and not 0 <= o[name] < 1:
            _fail(f"{prefix}.{name}", o[name], "use 0 <= beta < 1 (LlamaGen: 0.9, 0.95)")


def _check_tokenizer(vq):
    d = vq.data
    if d.source not in _SOURCES:
        _fail("tokenizer.data.source", d.source, f"use one of {', '.join(_SOURCES)}")
    _positive(d, "tokenizer.data", ("image_size",))
    _positive(vq, "tokenizer", ("num_steps",), allow_zero=True)
    _positive(vq, "tokenizer", ("batch_size", "log_every", "eval_every", "ckpt_every",
                                "keep_checkpoints", "eval_batch_size"))
    _check_optimizer(vq.optim, "tokenizer.optim")
    down = 2 ** (len(vq.model.encoder_ch_mult) - 1)
    if d.image_size % down:
        _fail("tokenizer.data.image_size", d.image_size,
              f"use a multiple of the tokenizer's downsample factor {down}")


def _check_generator(config):
    t, s, m = config.train, config.schedule, config.model
    _positive(t, "train", ("batch_size", "log_every", "ckpt_every", "keep_checkpoints",
                           "grad_accum"))
    # 0 steps only with weights to start from: the stage then converts and exports them.
    _positive(t, "train", ("num_steps",), allow_zero=bool(t.get("init_from")))
    _check_optimizer(t, "train")
    if t.batch_size % t.grad_accum:
        _fail("train.grad_accum", t.grad_accum,
              f"use a divisor of train.batch_size={t.batch_size}")
    lo, hi = t.rni_range
    if not 0 <= lo <= hi <= 1:
        _fail("train.rni_range", tuple(t.rni_range), "use (lo, hi) with 0 <= lo <= hi <= 1")
    if not 0 <= t.ema_decay < 1:
        _fail("train.ema_decay", t.ema_decay, "use 0 (off) or a decay in (0, 1), e.g. 0.9999")
    if s.kind not in _KINDS:
        _fail("schedule.kind", s.kind, f"use one of {', '.join(_KINDS)}")
    if s.correction_band < 0:
        _fail("schedule.correction_band", s.correction_band,
              "use 0 (the whole known area) or a number of rings >= 1")
    if config.tokens.augment not in _AUGMENTS:
        _fail("tokens.augment", config.tokens.augment, f"use one of {', '.join(_AUGMENTS)}")
    _positive(config.tokens, "tokens", ("batch_size",))
    if m.vocab_size != config.tokenizer.model.codebook_size:
        _fail("model.vocab_size", m.vocab_size,
              f"use the tokenizer's codebook_size={config.tokenizer.model.codebook_size}")
    sp = config.sample
    _positive(sp, "sample", ("num_per_class", "batch_size", "temperature"))
    _positive(sp, "sample", ("cfg_scale", "top_k", "eval_per_class"), allow_zero=True)
    if not 0 < sp.top_p <= 1:
        _fail("sample.top_p", sp.top_p, "use 0 < top_p <= 1 (1 = off)")
    bad = [c for c in sp.labels if not 0 <= c < m.num_classes]
    if bad:
        _fail("sample.labels", tuple(sp.labels), f"use class ids in [0, {m.num_classes})")


def check_workdir_writable(workdir) -> None:
    """Creates the workdir and writes (then removes) a probe file: a read-only or mistyped
    location fails now, not after the first stage has trained for hours."""
    root = fileio.path(workdir)
    probe = root / f".write_probe_{uuid.uuid4().hex[:8]}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--workdir={workdir}: cannot write there ({type(e).__name__}: "
                          f"{e}); pass a folder you can write to (local or gs://).") from None


def check_config(config, stages) -> None:
    """Every range and kind of the sections that `stages` will run (see the module doc)."""
    _check_tokenizer(config.tokenizer)
    if len(stages) > 1:
        _check_generator(config)
