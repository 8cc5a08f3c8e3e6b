"""The producers' client under its first, documented import path (docs/contract.md):
``from workers.producer import AnimateQueue``. It lives in :mod:`workers.producer`."""

from workers.producer import AnimateQueue, JobTimeout

__all__ = ["AnimateQueue", "JobTimeout"]
