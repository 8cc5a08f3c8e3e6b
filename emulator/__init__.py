"""An offline DashScope (AnimateAnyone) emulator: the API, its quotas and faults, over real HTTP.

Run it with ``python -m emulator``, or in-process with :class:`emulator.server.EmulatorServer`.
See ``emulator/README.md``.
"""
