"""Building blocks for the config files in configs/: every field documented once, here.

A config file (configs/*.py) assembles these sections and overrides what its setting needs;
command-line flags override single fields (`--config.tokenizer.num_steps=10`).

Sections:
  data       the image dataset (radar_jax/data.py).
  tokenizer  a whole tokenizer training run (radar_jax/train_vq.py): its own data, model, losses,
             optimizer, schedule of steps. Tokenizer-only configs (vq16.py, demo_vq.py) are this
             section at the top level.
  mesh       device mesh sizes (radar_jax/sharding.py).
"""

from __future__ import annotations

import ml_collections


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
    """VQ tokenizer architecture, LlamaGen's field names (radar_jax/models/vq.py).

    Defaults are LlamaGen's VQ-16: 256px images -> 16x16 codes from a 16384 x 8 codebook.
    """
    c = ml_collections.ConfigDict()
    c.codebook_size = 16384        # number of codebook entries
    c.codebook_embed_dim = 8       # dimension of each code vector
    c.codebook_l2_norm = True      # l2-normalise codes and latents before the nearest lookup
    c.codebook_show_usage = True   # report the fraction of codes used per batch
    c.commit_loss_beta = 0.25      # weight of the commitment loss
    c.entropy_loss_ratio = 0.0     # weight of the codebook entropy loss (0 = off)
    c.ch = 128                     # base channel count of encoder and decoder
    c.encoder_ch_mult = (1, 1, 2, 2, 4)  # channel multiplier per level; len-1 downsamplings
    c.decoder_ch_mult = (1, 1, 2, 2, 4)
    c.z_channels = 256             # encoder output channels before quant_conv
    c.num_res_blocks = 2           # residual blocks per level
    c.dropout_p = 0.0              # dropout inside residual blocks
    c.dtype = "float32"            # compute dtype: 'float32' or 'bfloat16' (params stay float32)
    c.update(overrides)
    return c


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
    c.mesh = mesh()
    c.update(overrides)
    return c


def schedule(kind: str = "euclidean", **overrides) -> ml_collections.ConfigDict:
    """The ring schedule (radar_jax/schedules.py) on the model's token grid."""
    c = ml_collections.ConfigDict()
    c.kind = kind        # 'euclidean' | 'crops' | 'raster' (next-token baseline)
    c.preset = ""        # crops: 'crops10' or 'crops13' (16x16 grids)
    c.sizes = ()         # crops: explicit nested crop sizes P_1 < ... < P_K = grid side
    c.num_steps = 0      # >0: an evenly spaced sub-ladder with this many steps (0 = all rings)
    c.update(overrides)
    return c


def generator_train(**overrides) -> ml_collections.ConfigDict:
    """Generator training (radar_jax/train.py); LlamaGen's ImageNet recipe as defaults."""
    c = ml_collections.ConfigDict()
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
    c.rds = False                # RDS: train on random sub-ladders of the ring ladder
    c.rds_mode = "per_example"   # 'per_example' (padded per-example layouts) | 'per_batch'
    c.rds_keep_prob = 0.5        # probability of keeping each intermediate ring boundary
    c.rds_min_steps = 2          # fewest steps of a sampled sub-ladder
    c.log_every = 100
    c.ckpt_every = 5000
    c.keep_checkpoints = 3
    c.update(overrides)
    return c


def sampling(**overrides) -> ml_collections.ConfigDict:
    """Sampling (radar_jax/sampling.py) for --mode=sample and the pipeline's last stage."""
    c = ml_collections.ConfigDict()
    c.labels = ()              # class ids to sample; () = every class in turn
    c.num_per_class = 8        # images per class label
    c.batch_size = 64          # images per sampler call
    c.num_steps = 0            # steps (sub-ladder of the trained schedule); 0 = all rings
    c.schedule = ""            # override the schedule kind ('' = the trained one)
    c.cfg_scale = 2.0          # classifier-free guidance scale (1 = off)
    c.cfg_schedule = "constant"  # 'constant' | 'linear' (ramp from 1 to cfg_scale over steps)
    c.temperature = 1.0
    c.top_k = 0                # 0 = off; 1 = greedy
    c.top_p = 1.0              # nucleus sampling threshold; 1 = off
    c.correct = True           # re-predict (correct) the known area at every step
    c.seed = 0
    c.eval_per_class = 50      # digits evaluation: samples per class for accuracy / Frechet
    c.update(overrides)
    return c


def tokens(**overrides) -> ml_collections.ConfigDict:
    """The token-map cache the generator trains on (encoded once with the tokenizer)."""
    c = ml_collections.ConfigDict()
    c.augment = "none"         # 'none' | 'flip' (+ flipped copies) | 'tencrop' (LlamaGen's 5
                               # crops of a 1.1x resize, each also flipped: 10 maps per image)
    c.batch_size = 256         # encoding batch size
    c.update(overrides)
    return c


def imagenet_pipeline(size: str, **train_overrides) -> ml_collections.ConfigDict:
    """RadAR-{B,L,XL} on ImageNet 256x256 with LlamaGen's VQ-16 tokenizer (configs/b.py, ...).

    The tokenizer stage starts from LlamaGen's released VQ-16 (the .pt you pass as
    --config.tokenizer.init_from) and, with tokenizer.num_steps=0, only converts and exports it;
    raise num_steps to fine-tune it first (RadAR fine-tunes it on ImageNet).
    """
    from radar_jax.models import transformer  # pylint: disable=g-import-not-at-top
    c = ml_collections.ConfigDict()
    c.seed = 0
    data_config = data("tfds", image_size=256, tfds_name="imagenet2012", random_crop=True,
                       flip=True, num_workers=16)
    c.tokenizer = tokenizer(vq_model(), data_config, batch_size=128, num_steps=0,
                            eval_batch_size=64, eval_batches=8, ckpt_every=5000,
                            eval_every=5000)
    # LlamaGen encodes ImageNet once with ten crops (5 crops x flips of a 1.1x resize).
    c.tokens = tokens(augment="tencrop", batch_size=128)
    c.model = transformer.model_config(size, vocab_size=16384, num_classes=1000,
                                       block_size=256, grid=(16, 16), dtype="bfloat16")
    c.schedule = schedule("euclidean")            # 13 rings on 16x16: the paper's 13 steps
    c.train = generator_train(rni_range=(0.0, 0.1), rds=True, **train_overrides)
    c.sample = sampling(num_per_class=8, batch_size=32, cfg_scale=2.0)
    c.mesh = mesh()
    return c


def param_summary(name: str, config: ml_collections.ConfigDict) -> str:
    """'RadAR-XL: 652.8M parameters, 609.6M non-embedding' for a pipeline config's model."""
    from radar_jax.models import transformer  # pylint: disable=g-import-not-at-top
    counts = transformer.count_params(config.model)
    return (f"{name}: {counts['total'] / 1e6:.1f}M parameters, "
            f"{counts['non_embedding'] / 1e6:.1f}M non-embedding")
