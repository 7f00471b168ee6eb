r"""ADM-compatible FID / sFID / IS / Precision / Recall of a sample batch against a reference.

  python -m radar_jax.evaluate_fid --inception=weights-inception-2015-12-05-6726825d.pth \
      --ref=VIRTUAL_imagenet256_labeled.npz --samples=samples.npz

prints one JSON line: {"fid": ..., "sfid": ..., "inception_score": ..., "precision": ...,
"recall": ..., "num_samples": N}. --samples is an ADM-format .npz (arr_0: uint8 (N, H, W, 3)) or
an image folder; --ref the same (ADM's reference batches work as they are). The reference
features are computed once with our network and cached next to --ref
(REF.radar_jax_stats.<weights id>.npz). --use_npz_stats takes mu/sigma from the reference npz
instead (computed by ADM's TensorFlow graph). Bad input: one line on stderr naming the flag,
exit status 2.
"""

import json
import logging
import sys

from absl import app
from absl import flags

_INCEPTION = flags.DEFINE_string(
    "inception", None, "torch-fidelity's weights-inception-2015-12-05-6726825d.pth, pytorch-fid's "
    "pt_inception-2015-12-05-6726825d.pth, or an .npz of the same state dict.")
_REF = flags.DEFINE_string(
    "ref", None, "Reference batch: ADM-format .npz (arr_0) such as "
    "VIRTUAL_imagenet256_labeled.npz, or an image folder.")
_SAMPLES = flags.DEFINE_string(
    "samples", None, "Samples: ADM-format .npz (arr_0 uint8 (N, H, W, 3)) or an image folder.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 200, "Images per Inception step (all devices).")
_USE_NPZ_STATS = flags.DEFINE_bool(
    "use_npz_stats", False, "Use the reference npz's own mu/sigma/mu_s/sigma_s (from ADM's "
    "TensorFlow graph) for FID/sFID instead of this network's reference statistics.")


class _BadFlag(Exception):
    """A flag value the run cannot use: reported as one line, exit status 2."""

    def __init__(self, flag: str, value, message: str):
        # Library messages start with the path; the flag already names it.
        message = message.removeprefix(f"{value}: ")
        super().__init__(f"--{flag}={value}: {message}")


def _run() -> dict:
    from radar_jax.metrics import adm  # pylint: disable=import-outside-toplevel
    from radar_jax.convert import inception as convert_inception  # pylint: disable=C0415

    for flag in (_INCEPTION, _REF, _SAMPLES):
        if not flag.value:
            raise _BadFlag(flag.name, "", "required; see --helpfull")
    if _BATCH_SIZE.value < 1:
        raise _BadFlag("batch_size", _BATCH_SIZE.value, "must be >= 1")
    # The cheap checks first: a wrong path fails before the network is loaded or compiled.
    try:
        samples = adm.load_images(_SAMPLES.value)
    except ValueError as e:
        raise _BadFlag("samples", _SAMPLES.value, str(e)) from None
    if samples.shape[0] < 4:
        raise _BadFlag("samples", _SAMPLES.value, f"{samples.shape[0]} images; Precision / "
                       "Recall (k=3 neighbours) need at least 4 (ADM uses 50,000)")
    try:
        inception = convert_inception.inception_from_file(_INCEPTION.value)
    except ValueError as e:
        raise _BadFlag("inception", _INCEPTION.value, str(e)) from None
    try:
        ref = adm.reference_stats(_REF.value, inception, batch_size=_BATCH_SIZE.value,
                                  use_npz_stats=_USE_NPZ_STATS.value)
    except ValueError as e:
        raise _BadFlag("ref", _REF.value, str(e)) from None
    logging.info("Computing the metrics of %d samples.", samples.shape[0])
    try:
        return adm.compute_metrics(inception, samples, ref, batch_size=_BATCH_SIZE.value)
    except ValueError as e:  # e.g. covariances too badly estimated for a Frechet distance
        raise _BadFlag("samples", _SAMPLES.value, str(e)) from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        result = _run()
    except _BadFlag as e:
        print(f"evaluate_fid: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    app.run(main)
