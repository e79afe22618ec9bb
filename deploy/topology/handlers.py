"""Handlers served by every server of the deploy topology.

Served with::

    python -m eventforge.worker --import handlers --service math --host 0.0.0.0 --port 9090

The worker contract: a non-empty ``HANDLERS`` dict of name -> plain callable,
an optional ``SERVICE_NAME`` (the ``--service`` flag wins over it), and an
optional ``setup(queue)`` called once with the worker's MessageQueue.
Arguments and results travel as JSON.
"""

import os
import socket
import time

SERVICE_NAME = "math"

#: Which server answered; docker-compose sets EVENTFORGE_NODE per service.
NODE = os.environ.get("EVENTFORGE_NODE") or socket.gethostname()


def add(a, b):
    """Add two numbers."""
    return a + b


def compute(n):
    """Sum of squares below ``n`` (some CPU work), tagged with the node."""
    n = int(n)
    if n < 0 or n > 10_000_000:
        raise ValueError(f"n must be between 0 and 10,000,000, not {n}")
    return {"node": NODE, "value": sum(i * i for i in range(n))}


def sleep(seconds):
    """Sleep (I/O-bound stand-in); returns the node that slept."""
    time.sleep(min(float(seconds), 10.0))
    return NODE


def node():
    """The name of the node serving this call."""
    return NODE


HANDLERS = {"add": add, "compute": compute, "sleep": sleep, "node": node}
