"""The Locust side: the gRPC user and its gevent glue, the locustfile (options, shapes, event
listeners), TLS/token settings and exact-latency files. Importing this package loads Locust
(gevent monkey-patching): import it before TensorFlow or requests."""
