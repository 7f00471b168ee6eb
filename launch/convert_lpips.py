"""Convert LPIPS-VGG16 weights (two files you provide) into the .npz that radar_jax reads.

Nothing is downloaded. You need:
  --vgg  torchvision's ImageNet VGG16 weights, e.g. vgg16-397923af.pth (keys features.{i}.*),
         or the same state dict as .npz / .safetensors;
  --lin  the lpips package's weights/v0.1/vgg.pth (keys lin{k}.model.1.weight), or .npz /
         .safetensors with the same keys.
Reading .pth needs torch (`pip install radar_jax[torch]`); .npz / .safetensors do not.

  python launch/convert_lpips.py --vgg vgg16-397923af.pth --lin vgg.pth --out lpips_vgg.npz

Then `radar_jax.models.lpips.load_lpips_params('lpips_vgg.npz')` gives LPIPS().apply's params.
"""

import argparse
import os
import sys

# Run from a checkout without installing: make the repo root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from radar_jax.convert.state_dict import load_state_dict  # pylint: disable=wrong-import-position
from radar_jax.models import lpips  # pylint: disable=wrong-import-position


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--vgg", required=True, help="torchvision vgg16 weights (.pth/.npz/...)")
    parser.add_argument("--lin", required=True, help="lpips weights/v0.1/vgg.pth (or .npz/...)")
    parser.add_argument("--out", required=True, help="output .npz path")
    args = parser.parse_args(argv)
    flat = lpips.lpips_params_from_state_dicts(load_state_dict(args.vgg), load_state_dict(args.lin))
    lpips.save_lpips_params(flat, args.out)
    n = sum(v.size for v in flat.values())
    print(f"wrote {len(flat)} LPIPS tensors ({n:,} values) to {args.out}")


if __name__ == "__main__":
    main()
