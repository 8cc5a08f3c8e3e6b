"""Redis: the job store, the governor (quotas and admission), timers, queue sampling, metrics."""
