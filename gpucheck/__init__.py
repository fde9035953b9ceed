"""The GPU check, apart from the load suite: every precision and compile mode of the servers
on one CUDA GPU, within one 8-minute command, on a host without network.

    python -m gpucheck prepare            # a networked machine: the wheels it carries, into .whl/
    scripts/gpu_check.sh OUTDIR           # the GPU host: installs .whl/ for the run, then the check

check (the check), budget (its time), wheels (what it carries to the host, and prepare).
"""
