"""Generator training batches as a pure function of the step: the same global batch whatever
the number of processes, so a run resumes on another process count, and 2 hosts train exactly
what 1 host would.

The examples of an epoch are a permutation of the cache drawn from (seed, epoch); the stream of
epochs is cut into global batches of `global_batch` examples (a batch may span two epochs), and
process p of P takes rows [p*B/P, (p+1)*B/P) of each, the rows its devices hold in the global
array that `jax.make_array_from_process_local_data` assembles. No iterator state exists: the
step in the train state is the position, so nothing about the data has to be checkpointed.
"""

from __future__ import annotations

import numpy as np


class GlobalTokenBatches:
    """batches(step) -> this process's slice of global batch `step` (steps count from 1).

    Args:
      cache: a TokenCache (len() and cache[indices] -> (codes (n, h, w), labels (n,))).
      global_batch: examples per step over all processes (a multiple of process_count).
      seed: the permutation seed.
      process_index, process_count: this process and how many share the batch.
    """

    def __init__(self, cache, global_batch: int, *, seed: int, process_index: int = 0,
                 process_count: int = 1):
        if global_batch % process_count:
            raise ValueError(f"batch_size={global_batch} is not divisible by the "
                             f"{process_count} processes; use a multiple of {process_count}.")
        if len(cache) == 0:
            raise ValueError("the token cache is empty: encode a dataset with images in it.")
        self.cache, self.global_batch, self.seed = cache, int(global_batch), int(seed)
        self.local = global_batch // process_count
        self.offset = process_index * self.local
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:  # one epoch's permutation at a time (ImageNet: 12.8M ints)
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.cache))
            self._epoch = epoch
        return self._perm

    def indices(self, step: int) -> np.ndarray:
        """(B/P,) int64 cache indices of this process's rows of global batch `step`."""
        n = len(self.cache)
        start = (step - 1) * self.global_batch + self.offset
        positions = np.arange(start, start + self.local)
        epochs, within = np.divmod(positions, n)
        out = np.empty(self.local, np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self._permutation(int(epoch))[within[sel]]
        return out

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        """{'codes': int32 (B/P, h, w), 'label': int32 (B/P,)} for global batch `step`."""
        codes, labels = self.cache[self.indices(step)]
        return {"codes": np.asarray(codes, np.int32), "label": np.asarray(labels, np.int32)}
