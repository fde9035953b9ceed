"""Framework-neutral serving core shared by torch_server and tf_server.

Everything that must behave identically for a fair comparison lives here once:
the Open Inference Protocol contract, codecs, validation, dynamic batching,
deadlines, metrics, health and shutdown. Framework packages add only a Backend.
"""
