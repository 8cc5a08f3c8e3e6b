"""The functional core: job states and transitions, the job record, the request, media limits,
policies and decisions. It imports only the standard library and :mod:`workers.errors`; nothing
here does I/O. Steps load a :class:`~workers.domain.job.Job`, call one decision with the remote
answer and the time, and apply what it returns."""
