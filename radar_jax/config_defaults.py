"""Building blocks for the config files in configs/: every field documented once, here.

A config file (configs/*.py) assembles these sections and overrides what its setting needs;
command-line flags override single fields (`--config.tokenizer.num_steps=10`).

Every config has one shape: a `tokenizer` section (a whole tokenizer training run, with its
own data), and, for a config that also trains a generator, the sections `tokens`, `model`,
`schedule`, `train`, `sample` and `mesh`. A tokenizer-only config (configs/demo_vq.py,
configs/vq16.py) is the same shape with just `seed` and `tokenizer`; the pipeline runs the stages
whose sections exist (radar_jax/pipeline.py, `stages_of`).

Sections:
  data       the image dataset (radar_jax/data/).
  tokenizer  a tokenizer training run (radar_jax/train_vq.py): data, model, losses, optimizer.
  tokens     the token cache the generator trains on (radar_jax/encode.py).
  model      the transformer (radar_jax/models/transformer.py, `model_config`).
  schedule   the ring schedule (radar_jax/schedules.py) and the correction band.
  train      generator training (radar_jax/train.py, train_step.py).
  sample     sampling and its quality evaluation (radar_jax/samples.py, quality.py).
  tpt        optional tokenizer post-training after the generator (radar_jax/tpt.py).
  eval       ImageNet evaluation, --mode=eval on non-digit data (radar_jax/imagenet_eval.py).
  mesh       device mesh sizes (radar_jax/sharding.py).
"""

from __future__ import annotations

import ml_collections

from radar_jax import sampling_plan


def data(source: str = "digits", image_size: int = 32, **overrides) -> ml_collections.ConfigDict:
    """The image dataset (see radar_jax/data.py)."""
    c = ml_collections.ConfigDict()
    c.source = source          # 'digits' (embedded sklearn digits) | 'imagefolder' | 'tfds'
    c.path = ""                # imagefolder: root directory with one subfolder per class
    c.tfds_name = ""           # tfds: dataset name, e.g. 'imagenet2012'
    c.tfds_data_dir = ""       # tfds: data_dir holding the prepared dataset ('' = TFDS default)
    c.train_split = "train"    # split used for training
    c.eval_split = "validation" if source != "digits" else "eval"  # held-out split
    c.image_size = image_size  # square output resolution in pixels
    c.random_crop = False      # train: random crop (True) or center crop after short-side resize
    c.flip = False             # train: random horizontal flips
    c.num_workers = 0          # grain worker processes (0 = in the main process)
    c.update(overrides)
    return c


def mesh(data_axis: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
    """Device mesh sizes; -1 on one axis takes all remaining devices (radar_jax/sharding.py)."""
    return ml_collections.ConfigDict(dict(data=data_axis, fsdp=fsdp, tensor=tensor))


def vq_model(**overrides) -> ml_collections.ConfigDict:
    """VQ tokenizer architecture under LlamaGen's field names; defaults are LlamaGen's VQ-16
    (256px -> 16x16 codes from a 16384 x 8 codebook). The fields and their meaning are defined
    once, in radar_jax/models/vq.py (`vq_config`)."""
    from radar_jax.models import vq  # pylint: disable=g-import-not-at-top
    return vq.vq_config(**overrides)


def tokenizer(model: ml_collections.ConfigDict, data_config: ml_collections.ConfigDict,
              **overrides) -> ml_collections.ConfigDict:
    """A tokenizer training run (radar_jax/train_vq.py), LlamaGen's recipe as defaults."""
    c = ml_collections.ConfigDict()
    c.seed = 0                     # seeds init, data order, dropout
    c.data = data_config
    c.model = model
    c.init_from = ""               # LlamaGen VQ checkpoint (.pt/.npz/.safetensors) to start from
    c.batch_size = 128             # global batch size (split over the mesh's data axes)
    c.num_steps = 400_000          # total training steps
    c.loss = ml_collections.ConfigDict()
    c.loss.reconstruction_weight = 1.0   # L2 pixel loss
    c.loss.perceptual_weight = 1.0       # LPIPS-VGG16; 0 (with a notice) without lpips_path
    c.loss.lpips_path = ""               # .npz written by launch/convert_lpips.py
    c.loss.codebook_weight = 1.0         # scales vq + commitment + entropy losses
    c.loss.disc_weight = 0.5             # generator's adversarial loss weight
    c.loss.disc_start = 20_000           # step at which the GAN losses switch on
    c.loss.disc_loss = "hinge"           # D loss: 'hinge' | 'vanilla' | 'non-saturating'
    c.loss.gen_loss = "hinge"            # generator adversarial loss: 'hinge' | 'non-saturating'
    c.loss.disc_ndf = 64                 # PatchGAN base channels
    c.loss.disc_layers = 3               # PatchGAN depth
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4                    # peak learning rate (generator and discriminator)
    c.optim.beta1 = 0.9
    c.optim.beta2 = 0.95
    c.optim.weight_decay = 0.0           # decoupled weight decay (0 = plain Adam)
    c.optim.grad_clip = 1.0              # global-norm clipping (0 = off)
    c.optim.warmup_steps = 0             # linear warmup from 0
    c.ema_decay = 0.0                    # EMA of the params (0 = off); eval uses EMA when on
    c.log_every = 50                     # steps between metric lines
    c.eval_every = 1000                  # steps between held-out evaluations (and at the end)
    c.ckpt_every = 1000                  # steps between checkpoints (and at the end)
    c.keep_checkpoints = 3               # checkpoints kept on disk
    c.eval_batch_size = 128
    c.eval_batches = 0                   # held-out batches per evaluation (0 = the whole split)
    c.eval_images = 8                    # originals/reconstructions shown in the PNG
    c.random_resolutions = ()            # () = off; else image sides, multiples of the
                                         # downsampling factor, e.g. (256, 320, 384): each step
                                         # trains at one drawn from (seed, step); batches are
                                         # read at the largest and resized on the device
    c.mesh = mesh()
    c.update(overrides)
    return c


def tpt(**overrides) -> ml_collections.ConfigDict:
    """Tokenizer post-training (radar_jax/tpt.py, docs/tpt.md): the decoder fine-tuned on the
    trained generator's token maps mixed with the encoder's, paired with the real images.

    The losses reuse config.tokenizer.loss (L2 and LPIPS weights, lpips_path, the PatchGAN's
    shape, loss kinds and disc_weight); the fields below are what post-training sets itself.
    """
    c = ml_collections.ConfigDict()
    c.enabled = False          # run the stage in --mode=all (after the generator)
    c.num_steps = 10_000       # decoder update steps
    c.batch_size = 64          # global batch of real images (split over the data axes)
    c.mix_ratio = 0.5          # fraction of tokens taken from the generator's prediction; the
                               # rest keep the encoder's ground-truth code
    c.prediction = "argmax"    # the generator's token per position: 'argmax' | 'sample'
    c.temperature = 1.0        # 'sample': softmax temperature (> 0)
    c.semantic_weight = 0.5    # weight of 1 - cos(MLP(decoder features), DINOv2 patch features)
    c.dinov2_path = ""         # DINOv2 checkpoint (HF model.safetensors with config.json, or
                               # torch-hub dinov2_vitb14_pretrain.pth); '' = semantic term off
    c.dino_image_size = 224    # side the real image is resized to for DINOv2 (multiple of 14)
    c.feature_level = 0        # decoder level whose features are aligned: i = conv_blocks_i's
                               # output before its upsample (0 = deepest, at the token grid)
    c.projector_hidden = 512   # hidden width of the 3-layer projector MLP (SiLU)
    c.disc_start = 0           # steps before the generator-side GAN loss is on (the fresh
                               # discriminator trains from step 1)
    c.lr = 1e-4                # peak learning rate (decoder + projector, and discriminator)
    c.beta1 = 0.9
    c.beta2 = 0.95
    c.weight_decay = 0.0       # decoupled weight decay (0 = plain Adam)
    c.grad_clip = 1.0          # global-norm clipping (0 = off)
    c.warmup_steps = 0         # linear warmup from 0
    c.log_every = 50           # steps between metric lines
    c.ckpt_every = 1000        # steps between checkpoints (and at the end)
    c.keep_checkpoints = 3     # checkpoints kept on disk
    c.update(overrides)
    return c


def schedule(kind: str = "euclidean", **overrides) -> ml_collections.ConfigDict:
    """The ring schedule (radar_jax/schedules.py) on the model's token grid."""
    c = ml_collections.ConfigDict()
    c.kind = kind        # 'euclidean' | 'crops' | 'raster' (next-token baseline)
    c.preset = ""        # crops: 'crops10' or 'crops13' (16x16 grids)
    c.sizes = ()         # crops: explicit nested crop sizes P_1 < ... < P_K = grid side
    c.num_steps = 0      # >0: an evenly spaced sub-ladder with this many steps (0 = all rings)
    c.correction_band = 0  # rings of the known area re-fed per step: 0 = all (the paper), b >= 1
                           # = the last b rings (cheaper; docs/method.md, "Correction band")
    c.update(overrides)
    return c


def schedule_from_config(s: ml_collections.ConfigDict, grid) -> "schedules.RingSchedule":
    """The RingSchedule a `schedule` section describes, on the model's token grid `grid`.

    Training builds the schedule here once and records it in the workdir; every later consumer
    (sampling, evaluation, the notebook) reads that record instead of calling this again.
    """
    from radar_jax import schedules  # pylint: disable=g-import-not-at-top
    kw = {}
    if s.kind == "crops":
        if s.get("preset"):
            kw["preset"] = s.preset
        if s.get("sizes"):
            kw["sizes"] = tuple(s.sizes)
    schedule = schedules.make_schedule(s.kind, tuple(grid), **kw)
    if s.get("num_steps") and not schedule.is_next_token and s.num_steps != schedule.num_steps:
        schedule = schedules.sub_ladder(schedule, s.num_steps)
    return schedule


def correction_band(value: int) -> int | None:
    """A config's correction_band (0 = all) as the schedule layer takes it (None = all)."""
    if value < 0:
        raise ValueError(f"correction_band={value}: use 0 (the whole known area, the paper) or "
                         "a number of rings b >= 1.")
    return int(value) or None


def generator_train(**overrides) -> ml_collections.ConfigDict:
    """Generator training (radar_jax/train.py); LlamaGen's ImageNet recipe as defaults."""
    c = ml_collections.ConfigDict()
    c.init_from = ""             # LlamaGen c2i GPT (.pt / .npz / .safetensors, e.g.
                                 # c2i_L_256.pt) whose weights start a fresh run (the prompt
                                 # embedding is new); with num_steps=0 it is only converted and
                                 # exported, a ready model (docs/evaluate.md)
    c.batch_size = 256           # global batch (split over the mesh's data axes)
    c.num_steps = 1_500_000      # ~300 ImageNet epochs at batch 256
    c.lr = 1e-4                  # peak learning rate
    c.beta1 = 0.9
    c.beta2 = 0.95
    c.weight_decay = 0.05        # AdamW decay on matrices and embeddings only (not norms)
    c.grad_clip = 1.0            # global-norm clipping (0 = off)
    c.warmup_steps = 0           # linear warmup from 0
    c.decay = "constant"         # after warmup: 'constant' | 'cosine' | 'linear'
    c.decay_steps = 0            # step where the decay ends (0 = num_steps)
    c.min_lr_ratio = 0.0         # final lr = min_lr_ratio * lr for cosine/linear
    c.grad_accum = 1             # micro-batches per step (batch_size must divide by it)
    c.ema_decay = 0.0            # EMA of params (0 = off); sampling uses EMA when on
    c.known_weight = 1.0         # loss weight of known-area (correction) tokens vs new-ring tokens
    c.rni_range = (0.0, 0.0)     # RNI: per-example fraction of known inputs replaced ~ U(lo, hi)
    c.rni_mode = "per_position"  # RNI: 'per_position' (a noised grid position has the same wrong
                                 # code in every block re-feeding it, as at sampling time) |
                                 # 'per_index' (each packed index noised apart: an ablation)
    c.rds = False                # RDS: train on random sub-ladders of the ring ladder
    c.rds_mode = "per_example"   # 'per_example' (padded per-example layouts) | 'per_batch'
    c.rds_keep_prob = 0.5        # probability of keeping each intermediate ring boundary
    c.rds_min_steps = 2          # fewest steps of a sampled sub-ladder
    c.rds_full_prob = 0.25       # probability of the full ladder (the sampler's default) per draw
    c.rds_buckets = 6            # static padded lengths of RDS batches (one compile each; 1 = pad
                                 # to the full length); 6 wastes ~6% on euclidean-13 16x16
    c.log_every = 100
    c.ckpt_every = 5000
    c.keep_checkpoints = 3
    c.update(overrides)
    return c


def sampling(**overrides) -> ml_collections.ConfigDict:
    """Sampling (radar_jax/samples.py) for --mode=sample, --mode=eval and the notebook.

    This section is the one place to change how a trained generator samples: the schedule, the
    step count and the band default to what it was trained with (the workdir's record).
    """
    c = ml_collections.ConfigDict()
    c.labels = ()              # class ids to sample; () = every class in turn
    c.num_per_class = 8        # images per class label
    c.batch_size = 64          # images per sampler call
    c.num_steps = 0            # steps (sub-ladder of the trained schedule); 0 = all rings
    c.schedule = ""            # override the schedule kind ('' = the trained one, read from
                               # the workdir's generator/schedule.json)
    c.correction_band = -1     # -1 = as trained; 0 = the whole known area; b >= 1 = last b rings
    c.grid = ()                # token grid (H, W) to sample on, e.g. (8, 12); () = the trained
                               # grid (the trained kind is rebuilt on it: samples.schedule_on_grid)
    c.cfg_scale = 2.0          # classifier-free guidance scale (1 = off)
    c.cfg_schedule = "constant"  # 'constant' | 'linear' (ramp from 1 to cfg_scale over steps)
    c.temperature = 1.0
    c.top_k = 0                # 0 = off; 1 = greedy
    c.top_p = 1.0              # nucleus sampling threshold; 1 = off
    c.correct = True           # re-predict (correct) the known area at every step
    c.max_groups = sampling_plan.DEFAULT_MAX_GROUPS  # at most this many groups of steps, each
                               # a compiled scan body: fewer compile faster and pad more (1-2
                               # suit small grids sampled on CPU; radar_jax/sampling_plan.py)
    c.seed = 0
    c.eval_per_class = 50      # digits evaluation: samples per class for accuracy / Frechet
    c.update(overrides)
    return c


def edit(**overrides) -> ml_collections.ConfigDict:
    """Zero-shot editing of images, --mode=edit (radar_jax/editing.py, docs/editing.md). The
    sampler options (cfg_scale, temperature, top_k/p, correct, batch_size) are config.sample's.
    """
    c = ml_collections.ConfigDict()
    c.input = ""               # image file(s) to edit, comma-separated, all of one size (any
                               # mode, read as RGB; sides multiples of the tokenizer's downsampling)
    c.op = "outpaint"          # 'outpaint' | 'inpaint' | 'class'
    c.box = ()                 # pixels (top, left, bottom, right) of the input, half-open:
                               # outpaint: the part kept (() = all); inpaint: the region
                               # regenerated (required); class: the region regenerated as
                               # new_label (() = the whole image)
    c.label = ""               # outpaint / inpaint: class id of the inputs, or comma-separated
                               # ids, one per input ("3" or "2,3,5"; a str so both parse)
    c.new_label = ""           # class: the class id(s) the region is regenerated as
    c.grid = ()                # outpaint: token grid (H, W) of the result; () = the trained grid
    c.prefill = False          # inpaint / class: True = the kept tokens are the known area
                               # before the region is drawn; False = seen once the rings reach
                               # them (the trained canvases; better on the digits demo)
    c.num_samples = 8          # results per input
    c.seed = 0
    c.output = ""              # PNG name in the samples folder ('' = edit_<op>.png)
    c.update(overrides)
    return c


def eval_(**overrides) -> ml_collections.ConfigDict:
    """ImageNet evaluation, --mode=eval on non-digit data (radar_jax/imagenet_eval.py,
    docs/evaluate.md). The sampler options (temperature, top_k/p, correct, schedule, band) are
    config.sample's; cfg_scales and num_steps sweep over its cfg_scale and num_steps."""
    c = ml_collections.ConfigDict()
    c.what = "samples"         # 'samples': FID/sFID/IS/Precision/Recall of generated images |
                               # 'reconstruction': rFID/PSNR/SSIM of the tokenizer on the
                               # held-out split (at most num_samples images)
    c.num_samples = 50_000     # images per setting (ADM / LlamaGen / VAR: 50,000)
    c.labels = "per_class"     # 'per_class': num_samples / num_classes of each class (50 per
                               # class, the VAR / MAR protocol) | 'uniform': random classes
                               # (LlamaGen's protocol)
    c.inception_path = ""      # torch-fidelity's weights-inception-2015-12-05-6726825d.pth (or
                               # pytorch-fid's pt_inception-2015-12-05-*.pth); '' = eval skipped
    c.reference = ""           # ADM reference batch (VIRTUAL_imagenet256_labeled.npz) or an
                               # image folder; its statistics are cached next to it
    c.use_npz_stats = False    # FID/sFID against the reference npz's own mu/sigma (ADM's TF
                               # graph) instead of this network's statistics of its arr_0
    c.cfg_scales = ()          # CFG scales to sweep, e.g. (1.5, 2.0); () = (sample.cfg_scale,)
    c.num_steps = ()           # step counts to sweep (sub-ladders), e.g. (13, 10); () =
                               # (sample.num_steps,); ignored by the raster schedule
    c.batch_size = 64          # images per sampler call on one process (split over its devices)
    c.shard_size = 1000        # images per shard file; a killed run resumes at a shard
    c.inception_batch_size = 200  # images per Inception step
    c.seed = 0                 # labels ('uniform') and shard s's draws (fold_in(seed, s))
    c.update(overrides)
    return c


def tokens(**overrides) -> ml_collections.ConfigDict:
    """The token-map cache the generator trains on (encoded once with the tokenizer)."""
    c = ml_collections.ConfigDict()
    c.augment = "none"         # 'none' | 'flip' (+ flipped copies) | 'tencrop' (LlamaGen's 5
                               # crops of a 1.1x resize, each also flipped: 10 maps per image)
    c.batch_size = 256         # encoding batch size
    c.rebuild = False          # encode again when the cache was written with other settings
    c.update(overrides)
    return c


def param_summary(name: str, config: ml_collections.ConfigDict) -> str:
    """'RadAR-XL: 652.8M parameters, 609.6M non-embedding' for a pipeline config's model."""
    from radar_jax.models import transformer  # pylint: disable=g-import-not-at-top
    counts = transformer.count_params(config.model)
    return (f"{name}: {counts['total'] / 1e6:.1f}M parameters, "
            f"{counts['non_embedding'] / 1e6:.1f}M non-embedding")
