"""Running the emulator: in a background thread (tests, the demo) or in the foreground (the CLI)."""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType

from aiohttp import web

from emulator.app import EMULATOR_KEY, Emulator, create_app
from emulator.config import EmulatorConfig


class EmulatorServer:
    """An emulator on a real socket, served from its own thread and event loop.

    >>> with EmulatorServer(EmulatorConfig(generation_seconds=1)) as server:
    ...     server.base_url  # "http://127.0.0.1:PORT/api/v1"
    """

    def __init__(
        self, config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.config = config or EmulatorConfig()
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._app: web.Application | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What DASHSCOPE_BASE_URL (or the SDK's ``base_http_api_url``) should be."""
        return f"{self.url}/api/v1"

    @property
    def emulator(self) -> Emulator:
        assert self._app is not None, "start() first"
        return self._app[EMULATOR_KEY]

    def finished_video_url(self, api_key: str, *, seconds: float = 2.0, timeout: float = 30) -> str:
        """Seed a template for ``api_key``, run one generation to SUCCEEDED, return its signed
        ``video_url`` (for copy tests and benchmarks)."""
        import time

        import httpx

        auth = {"Authorization": f"Bearer {api_key}"}
        with httpx.Client(base_url=self.url, timeout=60) as client:
            seeded = client.post(
                "/_emulator/templates", json={"api_key": api_key, "seconds": seconds}
            )
            template_id = seeded.raise_for_status().json()["template_id"]
            submitted = client.post(
                "/api/v1/services/aigc/image2video/video-synthesis",
                headers={**auth, "X-DashScope-Async": "enable"},
                json={
                    "model": "animate-anyone-gen2",
                    "input": {
                        "image_url": f"{self.url}/_emulator/samples/person.png",
                        "template_id": template_id,
                    },
                    "parameters": {},
                },
            )
            task_id = submitted.raise_for_status().json()["output"]["task_id"]
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                output = client.get(f"/api/v1/tasks/{task_id}", headers=auth).json()["output"]
                if output["task_status"] == "SUCCEEDED":
                    return str(output["video_url"])
                if output["task_status"] in ("FAILED", "CANCELED", "UNKNOWN"):
                    raise RuntimeError(f"task {task_id} ended {output['task_status']}")
                time.sleep(0.1)
        raise TimeoutError(f"task {task_id} did not succeed in {timeout} s")

    def start(self) -> EmulatorServer:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:  # reported to start()
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name="dashscope-emulator", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise failure[0]
        return self

    async def _serve(self) -> None:
        self._app = create_app(self.config)
        self._runner = web.AppRunner(self._app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:
            server = site._server
            assert isinstance(server, asyncio.base_events.Server)
            self.port = server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
