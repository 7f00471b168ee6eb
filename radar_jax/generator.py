"""`Generator`: a trained workdir, ready to sample from Python (the Colab notebook uses it).

  gen = Generator.from_workdir("configs/demo.py", "workdirs/demo")
  images = gen.sample([3, 5, 8])                      # (3, S, S, 3) float32 in [-1, 1]
  images = gen.sample([3, 5, 8], num_steps=4, cfg_scale=3.0, seed=1)

It samples exactly as `--mode=sample` does on the same workdir: the trained schedule and band
from the workdir's record, the sampler options of `config.sample` (CFG scale, temperature,
top-k/p) unless a call overrides them, and the same seeding, so the same seed and options give
the same images from the notebook and from the command line.
"""

from __future__ import annotations

import numpy as np

from radar_jax import config_io
from radar_jax import samples as samples_lib
from radar_jax import workdir as workdir_lib


class Generator:
    """The generator and tokenizer of a finished workdir, loaded once."""

    def __init__(self, config, workdir):
        self.config = config
        self.workdir = workdir_lib.Workdir(workdir)
        self.params = self.workdir.params(workdir_lib.GENERATOR)
        self.schedule, self.correction_band = self.workdir.trained_schedule()
        self.options = samples_lib.SampleOptions.from_config(config.sample)
        self.decode = samples_lib.make_decoder(config.tokenizer.model,
                                               self.workdir.params(workdir_lib.TOKENIZER))

    @classmethod
    def from_workdir(cls, config_path: str, workdir, **overrides) -> Generator:
        """`config_path` as --config takes it (e.g. configs/demo.py), with dotted overrides."""
        return cls(config_io.load_config(config_path, **overrides), workdir)

    def sample_codes(self, labels, *, seed: int | None = None, num_steps: int = 0,
                     schedule: str = "", correction_band: int = -1,
                     return_canvases: bool = False, **options):
        """Codes (N, H, W) int32 for class `labels`; `options` override config.sample's
        (cfg_scale, cfg_schedule, temperature, top_k, top_p, correct)."""
        s = self.config.sample
        sched, band = samples_lib.sampling_schedule(
            self.schedule, self.correction_band, kind=schedule or s.schedule,
            num_steps=num_steps or s.num_steps,
            band=correction_band if correction_band != -1 else s.correction_band)
        return samples_lib.generate(
            self.params, self.config.model, sched, np.asarray(labels, np.int32),
            s.seed if seed is None else seed, self.options.replace(**options),
            batch_size=s.batch_size, correction_band=band, canvases=return_canvases)

    def sample(self, labels, *, return_canvases: bool = False, **kw):
        """Images (N, S, S', 3) float32 in [-1, 1]; with return_canvases also the growth
        frames of the first batch (a list of uint8 grids, one per step, as in growth.gif)."""
        out = self.sample_codes(labels, return_canvases=return_canvases, **kw)
        if not return_canvases:
            return self.decode(out)
        codes, canvases = out
        return self.decode(codes), samples_lib.growth_frames(self.decode, canvases)
