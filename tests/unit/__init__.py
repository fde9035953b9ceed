"""In-process tests of one module at a time: no server, no child process, no socket."""
