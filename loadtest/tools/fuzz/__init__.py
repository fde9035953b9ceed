"""Fuzz ModelInfer: malformed requests against running servers, each owed a precise status.

    python -m loadtest fuzz --server both --requests 10000           # start both locally, fuzz, stop
    python -m loadtest fuzz --target 127.0.0.1:8001 --requests 10000  # a server that already runs

Every request starts as a valid one for a served zoo model (random batch size, sequence
length, values, raw or typed contents, input order, outputs asked for, request id,
unknown parameters, NaN and Inf among the floats, the optional mask sent or not); then
hypothesis draws mutations, each of which fixes the status the server owes:

- NOT_FOUND: an unknown model name or version (checked before anything else);
- INVALID_ARGUMENT: an unknown, duplicate or missing input; a wrong or unknown datatype;
  a wrong rank; a wrong fixed dimension; a negative, zero or huge dimension; raw
  contents of the wrong byte length or a wrong count of typed values; typed contents in
  the wrong field; raw and typed contents both set; more raw entries than inputs; a
  value out of the input's range; a batch above max_batch_size; a sequence above the
  model's max_len; inputs that disagree on the batch or sequence length; an unknown or
  repeated output; no inputs at all. Several may be drawn at once (on different inputs:
  none can repair another);
- OK when none is drawn: then the reply must be well formed (the outputs asked for, in
  that order, with the request's batch and sequence length, byte lengths that match, the
  request id echoed).

Fixed cases beside them: declared shapes far too large to allocate (petabytes, and a few
hundred MB) with a few bytes of contents, raw and typed, must be INVALID_ARGUMENT without
the server allocating them (its RSS is sampled every 2 ms when this command started it,
or ``--pid`` names it); a message over the server's limit must be RESOURCE_EXHAUSTED.

Each answer is checked: exactly the owed status code (so never UNKNOWN or INTERNAL, no
hang: every call has a deadline), a non-empty one-line message with no traceback in it.
After the run, health must say SERVING and the same valid requests sent before the run
must get the same answers. Writes one JSON summary to ``--out`` (or stdout): requests and
status codes per target, mutations drawn, mismatches with their requests; exits 1 on any
mismatch.

The models are the zoo's with their default parameters (as ``serve`` runs them); the
command checks that the server's metadata agrees. Loopback only; ``tests/integration/test_fuzz.py``
runs a bounded number of the same cases against both servers in-process.
"""
