"""DashScope: the HTTP client of the task API, and its fitting to the VideoApi port."""
