"""`Generator`: a trained workdir, ready to sample and edit from Python (the notebook uses it).

  gen = Generator.from_workdir("configs/demo.py", "workdirs/demo")
  images = gen.sample([3, 5, 8])                      # (3, S, S, 3) float32 in [-1, 1]
  images = gen.sample([3, 5, 8], num_steps=4, cfg_scale=3.0, seed=1)
  wide = gen.sample([3, 5, 8], grid=(8, 12))          # another canvas: (3, S, 1.5 S, 3)
  result = gen.outpaint(image, label=3, grid=(12, 12))  # radar_jax/editing.py

It samples exactly as `--mode=sample` does on the same workdir: the trained schedule and band
from the workdir's record, the sampler options of `config.sample` (CFG scale, temperature,
top-k/p) unless a call overrides them, and the same seeding, so the same seed and options give
the same images from the notebook and from the command line. `Generator.from_params` wraps
params that live outside a workdir (e.g. converted LlamaGen checkpoints).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from radar_jax import config_defaults as cd
from radar_jax import config_io
from radar_jax import editing
from radar_jax import samples as samples_lib
from radar_jax import schedules
from radar_jax import workdir as workdir_lib
from radar_jax.models import vq as vq_lib


class Generator:
    """The generator and tokenizer of a finished workdir (or of given params), loaded once.

    Attributes: config (the sections `model`, `sample`, `tokenizer.model` are used), params,
    schedule and correction_band (as trained), options (config.sample's SampleOptions),
    decode (codes (N, h, w) -> images (N, h*f, w*f, 3) float32 in [-1, 1]).
    """

    def __init__(self, config, workdir):
        self.workdir = workdir_lib.Workdir(workdir)
        schedule, band = self.workdir.trained_schedule()
        self._setup(config, self.workdir.params(workdir_lib.GENERATOR),
                    self.workdir.params(workdir_lib.TOKENIZER), schedule, band)

    def _setup(self, config, params, vq_params, schedule, correction_band):
        self.config = config
        self.params = params
        self.vq_params = vq_params
        self.schedule, self.correction_band = schedule, correction_band
        self.options = samples_lib.SampleOptions.from_config(config.sample)
        self.decode = samples_lib.make_decoder(config.tokenizer.model, vq_params)
        vq_model = vq_lib.VQModel(config.tokenizer.model)
        self._encode = jax.jit(lambda p, x: vq_model.apply({"params": p}, x, method="encode"))

    @classmethod
    def from_workdir(cls, config_path: str, workdir, **overrides) -> Generator:
        """`config_path` as --config takes it (e.g. configs/demo.py), with dotted overrides."""
        return cls(config_io.load_config(config_path, **overrides), workdir)

    @classmethod
    def from_params(cls, model_config, params, vq_config, vq_params, *, schedule=None,
                    correction_band: int | None = None, sample_config=None) -> Generator:
        """A Generator over params that are not in a workdir (e.g. from
        `radar_jax.convert.load_llamagen_gpt` / `load_llamagen_vq`).

        schedule: the RingSchedule the model was trained with; None = 'raster' on the model's
        grid (what a LlamaGen GPT is). sample_config: a `config_defaults.sampling()` section
        (None = its defaults).
        """
        config = ml_collections.ConfigDict()
        config.model = model_config
        config.tokenizer = ml_collections.ConfigDict({"model": vq_config})
        config.sample = sample_config if sample_config is not None else cd.sampling()
        gen = cls.__new__(cls)
        gen.workdir = None
        schedule = schedule or schedules.make_schedule("raster", tuple(model_config.grid))
        gen._setup(config, jax.device_put(params), jax.device_put(vq_params), schedule,
                   correction_band)
        return gen

    # ---------------------------------------------------------------- tokens
    def encode(self, images) -> np.ndarray:
        """images (N, S, S', 3) float in [-1, 1] (sides multiples of the tokenizer's
        downsampling f) -> codes (N, S/f, S'/f) int32."""
        images = np.asarray(images, np.float32)
        return np.concatenate([np.asarray(self._encode(self.vq_params,
                                                       jnp.asarray(images[i:i + 256])))
                               for i in range(0, len(images), 256)])

    @property
    def downsample(self) -> int:
        """Image pixels per token along each axis."""
        return vq_lib.resolve_vq_config(self.config.tokenizer.model).downsample

    # ---------------------------------------------------------------- sampling
    def schedule_for(self, *, grid=None, schedule: str = "", num_steps: int = 0,
                     correction_band: int = -1):
        """(RingSchedule, band) this generator samples with: config.sample's choices unless
        given (grid (H', W') or None; schedule kind; num_steps; band -1 = config's)."""
        s = self.config.sample
        return samples_lib.sampling_schedule(
            self.schedule, self.correction_band, kind=schedule or s.schedule,
            num_steps=num_steps or s.num_steps,
            band=correction_band if correction_band != -1 else s.correction_band,
            grid=tuple(grid) if grid else tuple(s.get("grid", ())))

    def sample_with(self, schedule, labels, *, seed: int | None = None, correction_band=-1,
                    fixed_codes=None, fixed_mask=None, return_canvases: bool = False,
                    **options):
        """Codes (N, H, W) int32 for `labels` (N,) on any RingSchedule (its grid is the
        canvas), with optional fixed tokens (N, H, W) int / bool: the editing entry point.
        correction_band: -1 = as trained (or config.sample's), None = all, b >= 1."""
        s = self.config.sample
        if correction_band == -1:
            _, correction_band = self.schedule_for()
        return samples_lib.generate(
            self.params, self.config.model, schedule, np.asarray(labels, np.int32),
            s.seed if seed is None else seed, self.options.replace(**options),
            batch_size=s.batch_size, correction_band=correction_band,
            canvases=return_canvases, fixed_codes=fixed_codes, fixed_mask=fixed_mask)

    def sample_codes(self, labels, *, seed: int | None = None, num_steps: int = 0,
                     schedule: str = "", correction_band: int = -1, grid=None,
                     return_canvases: bool = False, **options):
        """Codes (N, H, W) int32 for class `labels`; `options` override config.sample's
        (cfg_scale, cfg_schedule, temperature, top_k, top_p, correct). grid: (H', W') token
        grid to sample on (None = config.sample.grid, () there = the trained grid)."""
        sched, band = self.schedule_for(grid=grid, schedule=schedule, num_steps=num_steps,
                                        correction_band=correction_band)
        return self.sample_with(sched, labels, seed=seed, correction_band=band,
                                return_canvases=return_canvases, **options)

    def sample(self, labels, *, return_canvases: bool = False, **kw):
        """Images (N, S, S', 3) float32 in [-1, 1]; with return_canvases also the growth
        frames of the first batch (a list of uint8 grids, one per step, as in growth.gif)."""
        out = self.sample_codes(labels, return_canvases=return_canvases, **kw)
        if not return_canvases:
            return self.decode(out)
        codes, canvases = out
        return self.decode(codes), samples_lib.growth_frames(self.decode, canvases)

    # ---------------------------------------------------------------- editing
    def outpaint(self, images, labels, **kw):
        """`radar_jax.editing.outpaint` with this generator."""
        return editing.outpaint(self, images, labels, **kw)

    def inpaint(self, images, region, labels, **kw):
        """`radar_jax.editing.inpaint` with this generator."""
        return editing.inpaint(self, images, region, labels, **kw)

    def edit_class(self, images, region, new_labels, **kw):
        """`radar_jax.editing.edit_class` with this generator."""
        return editing.edit_class(self, images, region, new_labels, **kw)
