"""The adapters: each implements a port (workers/ports.py) on one technology."""
