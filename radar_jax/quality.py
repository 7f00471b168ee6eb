"""The eval stage on the embedded digits: sample quality per schedule, ladder and correction.

On the digits, quality is measured with a classifier fitted on the real 8x8 training digits
(radar_jax/evaluation.py): its accuracy on samples resized to 8x8, against the class asked for,
and the Frechet distance between samples and the held-out real digits in its feature space.
This is the small-scale stand-in for Inception accuracy and FID, and it is cheap enough to run
for every row of the table: the trained ladder, the sub-ladders RDS trained the model for, and
the trained ladder with correction off.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from radar_jax import data as data_lib
from radar_jax import evaluation
from radar_jax import fileio
from radar_jax import samples as samples_lib
from radar_jax import schedules
from radar_jax import workdir as workdir_lib


def evaluation_cases(trained: schedules.RingSchedule, rds: bool):
    """(schedule, correct) rows: the trained ladder with correction on and off and, when the
    generator trained with RDS, every shorter sub-ladder down to 3 steps."""
    cases = [(trained, True)]
    if trained.is_next_token:  # next-token AR has one ladder and nothing to correct
        return cases
    cases.append((trained, False))
    if rds:
        cases += [(schedules.sub_ladder(trained, n), True)
                  for n in range(trained.num_steps - 1, 2, -1)]
    return cases


def evaluate(config, wd: workdir_lib.Workdir) -> list[dict] | None:
    """The digits quality table; writes samples/metrics.json and returns its rows (None on a
    dataset other than the digits: ImageNet FID needs the Inception weights file)."""
    if config.tokenizer.data.source != "digits":
        logging.info("Sample quality metrics need the digits dataset (FID on ImageNet needs "
                     "Inception weights, which radar_jax does not download): skipping.")
        return None
    s = config.sample
    options = samples_lib.SampleOptions.from_config(s)
    trained, band = wd.trained_schedule()
    _, band = samples_lib.sampling_schedule(trained, band, band=s.correction_band)
    params = wd.params(workdir_lib.GENERATOR)
    # The rows decode with the original tokenizer; when tokenizer post-training finished, the
    # trained ladder's codes are also decoded by the post-trained one ("RadAR + TPT"): the
    # same generator and the same codes, so the two rows differ only in the decoder.
    decode = samples_lib.make_decoder(config.tokenizer.model, wd.params(workdir_lib.TOKENIZER))
    decode_tpt = (samples_lib.make_decoder(config.tokenizer.model,
                                           wd.params(workdir_lib.TOKENIZER_TPT))
                  if wd.is_finished(workdir_lib.TOKENIZER_TPT) else None)
    classifier = evaluation.DigitClassifier()
    reference, reference_labels = data_lib.load_digits_split("eval")
    labels = np.repeat(np.arange(config.model.num_classes, dtype=np.int32), s.eval_per_class)
    rows = []
    for schedule, correct in evaluation_cases(trained, config.train.rds):
        t0 = time.perf_counter()
        # seed + 1: the evaluation's samples are not the ones in samples.png.
        codes = samples_lib.generate(params, config.model, schedule, labels, s.seed + 1,
                                     options.replace(correct=correct), batch_size=s.batch_size,
                                     correction_band=band)
        seconds = time.perf_counter() - t0
        decoders = [("original", decode)]
        if decode_tpt is not None and not rows:
            decoders.append(("TPT", decode_tpt))
        for decoder, run_decode in decoders:
            digits = data_lib.images_to_digits(run_decode(codes))
            quality = evaluation.digits_quality(digits, labels, reference, classifier)
            rows.append(dict(schedule=schedule.kind, steps=schedule.num_steps, correct=correct,
                             correction_band=band or 0, decoder=decoder,
                             accuracy=float(quality["accuracy"]), fd=float(quality["fd"]),
                             samples=len(labels), sample_seconds=round(seconds, 2)))
            logging.info("Quality %s", rows[-1])
    real = evaluation.digits_quality(reference, reference_labels, reference, classifier)
    result = dict(rows=rows, real_heldout_accuracy=float(real["accuracy"]),
                  cfg_scale=options.cfg_scale, temperature=options.temperature)
    if wd.is_primary:
        fileio.write_json(wd.stage(workdir_lib.SAMPLES) / "metrics.json", result)
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of evaluate()'s rows."""
    lines = ["| schedule | steps | correction | decoder | accuracy | Frechet distance |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['schedule']} | {r['steps']} | {'on' if r['correct'] else 'off'} | "
                     f"{r.get('decoder', 'original')} | {r['accuracy']:.3f} | {r['fd']:.3f} |")
    return "\n".join(lines)
