"""PyTorch side of the serving pair: zoo-model builders, ``torch.export`` artifacts and TorchBackend.

``torch_server.framework.FRAMEWORK`` is the entry point used by the shared serving core.
"""
