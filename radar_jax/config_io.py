"""Config files as the CLI, the tests and the notebook load them.

`load_config("configs/imagenet.py:XL", **{"train.num_steps": 10})` is what
`--config=configs/imagenet.py:XL --config.train.num_steps=10` gives main.py: the file's
`get_config(arg)` (big_vision's convention: the text after ':' is the argument), then dotted
overrides.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections


class ConfigError(ValueError):
    """A user error in the config, the flags or the workdir: main.py prints its one-line
    message (naming the field, the value and the fix) and exits with status 2, no traceback."""


def load_config(spec: str, **overrides) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the config file `path[:arg]`, with dotted-key overrides."""
    path, _, arg = str(spec).partition(":")
    module_spec = importlib.util.spec_from_file_location("radar_jax_config", path)
    if module_spec is None or not os.path.exists(path):
        raise FileNotFoundError(f"No config file at {path}: pass e.g. configs/demo.py.")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config
