"""Training side. Only `data` and `client` may be imported by the daemon: everything else imports torch
and runs in the worker process."""
