"""The comparison: the plan of steps (``plan``), the run that starts or targets both servers
and loads them alike (``run``), parity of their outputs (``parity``) and the fidelity guard on it
(``fidelity``), the SLO capacity search (``capacity``, run by ``capacity_phase``), SIGTERM under load
(``drain``) and the report (``report``)."""
