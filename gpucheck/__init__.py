"""The GPU check, apart from the load suite: every precision and compile mode of the servers
on one CUDA GPU, within one 8-minute command, on a host without network.

    python -m gpucheck prepare            # a networked machine: the wheels it carries, into .whl/
    scripts/gpu_check.sh OUTDIR           # the GPU host: installs .whl/ for the run, then the check

cli (the command line, ``run --help``), check (the runs, the sweep, the report's data), measure
(what one step measures), report (its markdown), options (options and fixed settings), budget
(its time), wheels (what it carries to the host, and prepare).
"""
