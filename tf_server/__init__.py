"""TensorFlow side of the serving pair: zoo-model builders, SavedModel artifacts and TFBackend.

``tf_server.framework.FRAMEWORK`` is the entry point used by the shared serving core.
"""
