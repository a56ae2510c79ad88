"""A `gallery worker` for the crash drill, which pauses after each grid thumbnail it stores.

Run as `python -m tests.pausing_worker MARKER JOB_TIMEOUT` with the settings in the
environment. After storing a thumbnail it writes the key to the file MARKER and sleeps,
so a test can kill it between the thumbnail and the other renditions. The pause lives
only here: the product's worker has no such hook.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from gallery import storage
from gallery.settings import Settings
from gallery.storage import Storage
from worker.settings import make_worker

PAUSE_SECONDS = 600


def main() -> None:
    marker, job_timeout = Path(sys.argv[1]), int(sys.argv[2])
    write = Storage.write

    async def write_then_pause(self: Storage, key: str, body: bytes, **options: Any) -> None:
        await write(self, key, body, **options)
        if key.split("/")[2] == storage.thumbnail_key("x", "x").split("/")[2]:
            marker.write_text(key)
            await asyncio.sleep(PAUSE_SECONDS)

    Storage.write = write_then_pause  # type: ignore[method-assign]  # the pause under test
    logging.basicConfig(level=logging.INFO)
    make_worker(Settings.from_env(), job_timeout=job_timeout).run()


if __name__ == "__main__":
    main()
