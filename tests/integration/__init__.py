"""Tests against real servers (in this process on port 0, or child processes), Locust runs,
the tools' command lines, the docs' commands and the deployment files."""
