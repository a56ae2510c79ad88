"""The names of the worker's jobs and how the web app queues them."""

from arq.connections import ArqRedis

VERIFY_UPLOAD = "verify_upload"


def verify_job_id(upload_id: str) -> str:
    """Return the arq job id for an upload, so a second request cannot queue it twice."""
    return f"verify:{upload_id}"


async def enqueue_verify(queue: ArqRedis, upload_id: str) -> None:
    await queue.enqueue_job(VERIFY_UPLOAD, upload_id, _job_id=verify_job_id(upload_id))
