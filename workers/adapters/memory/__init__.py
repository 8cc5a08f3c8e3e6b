"""In-memory twins of the stateful Redis adapters, held to the same contract suites."""
