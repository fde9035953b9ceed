"""The comparison: the plan of steps (``plan``), the run that starts or targets both servers
and loads them alike (``run``), parity of their outputs (``parity``), the SLO capacity search
(``capacity``, run by ``capacity_phase``) and the report (``report``)."""
