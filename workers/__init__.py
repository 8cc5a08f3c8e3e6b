"""animate-queue's workers: the job pipeline and its adapters (DashScope, S3, Redis).

The pipeline arrives with the generation-pipeline issue; importing this package has no side effects.
"""
