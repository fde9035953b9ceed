"""Your own model, in both frameworks, in the model repositories both servers serve from.

    python examples/own_model.py --out my-models [--version 1] [--seed 0]

writes one small network, ``ranker``, written once in PyTorch and once in TensorFlow with the
same weights (from one numpy seed), as a user brings a model to a model server:

    my-models/torch/ranker/config.json          the input range the artifact cannot tell
    my-models/torch/ranker/<version>/model.pt2  torch.export.save of the exported program
    my-models/tf/ranker/config.json
    my-models/tf/ranker/<version>/              tf.saved_model.save, a serving_default signature

``ranker`` takes ``features`` FP32 [-1, 16] (dense features) and ``item`` INT64 [-1] (an item id
below 1000) and returns ``score`` FP32 [-1, 1] and ``embedding`` FP32 [-1, 8]: the item's
embedding added to a projection of the features, through a ReLU, then a linear score. Serve and
compare it (docs/serving.md, "Your own models"):

    python -m torch_server serve --model-repository my-models/torch
    python -m tf_server serve --model-repository my-models/tf
    python -m loadtest compare --model ranker --torch-repository my-models/torch --tf-repository my-models/tf

A new version (``--version 2 --seed 1``) written into a served repository is picked up, warmed
up and switched to while serving. Nothing here belongs to this project's model zoo.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

ITEMS = 1000
FEATURES = 16
WIDTH = 8
CONFIG = {"inputs": {"item": {"range": [0, ITEMS - 1]}}}


def weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "items": (rng.standard_normal((ITEMS, WIDTH)) * 0.5).astype(np.float32),
        "project": (rng.standard_normal((FEATURES, WIDTH)) / np.sqrt(FEATURES)).astype(np.float32),
        "score": (rng.standard_normal((WIDTH, 1)) / np.sqrt(WIDTH)).astype(np.float32),
    }


def save_torch(version_dir: Path, w: dict[str, np.ndarray]) -> None:
    import torch
    from torch.export import Dim

    class Ranker(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.items = torch.nn.Parameter(torch.from_numpy(w["items"]), requires_grad=False)
            self.project = torch.nn.Parameter(torch.from_numpy(w["project"]), requires_grad=False)
            self.score = torch.nn.Parameter(torch.from_numpy(w["score"]), requires_grad=False)

        def forward(self, features: torch.Tensor, item: torch.Tensor) -> dict[str, torch.Tensor]:
            embedding = torch.relu(features @ self.project + self.items[item])
            return {"score": embedding @ self.score, "embedding": embedding}

    batch = Dim("batch", min=1, max=1024)
    example = (torch.zeros(2, FEATURES), torch.zeros(2, dtype=torch.int64))
    program = torch.export.export(Ranker().eval(), example, dynamic_shapes={"features": {0: batch}, "item": {0: batch}})
    version_dir.mkdir(parents=True)
    torch.export.save(program, str(version_dir / "model.pt2"))


def save_tf(version_dir: Path, w: dict[str, np.ndarray]) -> None:
    import tensorflow as tf

    class Ranker(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weights = {name: tf.constant(array) for name, array in w.items()}

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, FEATURES], tf.float32, name="features"),
                tf.TensorSpec([None], tf.int64, name="item"),
            ]
        )
        def serve(self, features: tf.Tensor, item: tf.Tensor) -> dict[str, tf.Tensor]:
            embedding = tf.nn.relu(features @ self.weights["project"] + tf.gather(self.weights["items"], item))
            return {"score": embedding @ self.weights["score"], "embedding": embedding}

    module = Ranker()
    tf.saved_model.save(module, str(version_dir), signatures={"serving_default": module.serve.get_concrete_function()})


def publish(root: Path, name: str, version: int, write: Callable[[Path], None]) -> Path:
    """Write a version next to the repository, then rename it in whole: a server polling the
    repository never sees half a version."""
    model_root = root / name
    model_root.mkdir(parents=True, exist_ok=True)
    (model_root / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    target = model_root / str(version)
    if target.exists():
        raise SystemExit(f"{target} exists: versions are never rewritten in place, write a new one")
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=root))
    shutil.rmtree(staging)
    write(staging)
    staging.rename(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the torch/ and tf/ repositories")
    parser.add_argument("--version", type=int, default=1, help="version folder to write (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights (another seed: another model)")
    args = parser.parse_args(argv)
    w = weights(args.seed)
    written = [
        publish(args.out / "torch", "ranker", args.version, lambda path: save_torch(path, w)),
        publish(args.out / "tf", "ranker", args.version, lambda path: save_tf(path, w)),
    ]
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
