"""The contract's vocabulary: what every layer of this project speaks, and nothing else.

The Open Inference Protocol stubs (``contract.protocol``, generated from
proto/inference.proto into a private descriptor pool), its datatypes and TensorSpec
(``contract.datatypes``), the codecs between protocol tensors and numpy arrays
(``contract.codec``), and the protocol's error vocabulary, each error naming its gRPC
status code (``contract.errors``). serving, modelzoo, client and loadtest all stand on
this package; it imports none of them.
"""
