"""Framework-neutral model definitions with canonical weights from a fixed seed.

``modelzoo.get("mlp")`` returns a ModelDefinition: its contract (inputs, outputs),
its parameters and its weights as numpy arrays. torch_server and tf_server each
build the same network from those weights; nothing is downloaded.
"""

from modelzoo.base import ModelDefinition, get, names

__all__ = ["ModelDefinition", "get", "names"]
