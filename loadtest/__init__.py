"""Load tests and the torch_server / tf_server comparison: ``python -m loadtest --help``.

Rooms: ``users`` (Locust: the gRPC user, the locustfile, shapes, TLS, latency files, the
``locust`` launcher), ``compare`` (plan, prepare, steps, run, command, parity, fidelity, drain,
capacity and capacity_phase (the SLO capacity search); the report: verdict, tables, plots, report),
``tools`` (bench, stages, bare, coldstart, overhead, overload,
scaling, soak, fuzz). Shared at the top: ``cli`` (the options and output convention every
command shares), ``servers`` (starting servers), ``workload`` (what a request carries),
``driver`` (asyncio load: grpc.aio, no Locust), ``openloop`` (Locust's constant-arrival-rate
user), ``stats`` and ``sampling`` (latency statistics, resource samples).

Import order matters: modules that load Locust (gevent monkey patching) must be
imported before TensorFlow or requests. No module here imports a framework when it is
imported; ``tools.stages`` loads the one it measures, in its own process, when it runs.
"""
