"""Set when this worker process begins a warm shutdown (SIGTERM / Ctrl-C): a running job then
stops at its next cancel check, goes back to the queue with its checkpoints kept, and is
dispatched again, so a restarted worker resumes it instead of waiting for the lease to expire."""

import threading

SHUTTING_DOWN = threading.Event()
