"""animate-queue's workers, in layers (docs/architecture.md): ``domain`` (pure rules and
decisions), ``ports`` (the interfaces steps call), ``steps`` (one module per use case),
``adapters`` (Redis, in-memory twins, DashScope, S3, the web), ``bootstrap`` (settings into a
context) and ``entrypoints`` (Celery, the CLI). ``producer`` is the client for other services.
Importing this package has no side effects.
"""
