"""Small in-memory tasks (scikit-learn digits, upsampled to 16 px) for benchmarks and tests of the system,
independent of data.py so that mu2net's tests need no catalog."""

import numpy as np


class ArrayTask:
    """A TaskData over in-memory arrays: 70/15/15 train/validation/test split of a fixed order."""

    def __init__(self, name: str, x: np.ndarray, y: np.ndarray, num_classes: int):
        n = len(x)
        a, b = int(0.7 * n), int(0.85 * n)
        self.name, self.num_classes, self.image_size = name, num_classes, x.shape[1]
        self.num_train = a
        self._x, self._y = x, y
        self._splits = {"train": slice(0, a), "validation": slice(a, b), "test": slice(b, n)}

    def train_batch(self, seed: int, step: int, batch_size: int):
        n, b = self.num_train, batch_size
        pos = np.arange(step * b, (step + 1) * b)
        perms = {e: np.random.default_rng([seed, e]).permutation(n) for e in np.unique(pos // n)}
        idx = np.array([perms[p // n][p % n] for p in pos])
        return self._x[idx], self._y[idx]

    def eval_batches(self, split: str, batch_size: int):
        sl = self._splits[split]
        x, y = self._x[sl], self._y[sl]
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            pad = batch_size - len(xb)
            yield (np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), np.uint8)]),
                   np.concatenate([yb, np.full(pad, -1, np.int32)]))


def digits_tasks(size: int = 16) -> list[ArrayTask]:
    """digits (10 classes) and digits parity (2 classes), VTAB-style: two tasks from one dataset."""
    from sklearn.datasets import load_digits

    d = load_digits()
    img = (d.images / 16 * 255).astype(np.uint8)
    r = size // 8
    img = np.repeat(np.kron(img, np.ones((r, r), np.uint8))[..., None], 3, -1)
    y = d.target.astype(np.int32)
    return [ArrayTask("digits", img, y, 10), ArrayTask("digits_parity", img, y % 2, 2)]
