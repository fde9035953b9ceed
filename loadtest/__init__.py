"""Load tests and the torch_server / tf_server comparison.

Import order matters: modules that load Locust (gevent monkey patching) must be
imported before TensorFlow or requests. Nothing in this package imports either
framework.
"""
