"""Optional adapters for eventforge that need third-party packages.

The core, ``eventforge.py``, uses the standard library only, and
``import eventforge`` never imports anything from this package.  Each adapter
here is a separate module that imports its dependency lazily (when the adapter
is first constructed, not at import time of ``eventforge``) and raises a clear
``ImportError`` naming the extra to install when that dependency is missing:

``eventforge_ext.redis``
    ``RedisTransport``: a Transport over Redis PUBLISH/SUBSCRIBE
    (``pip install 'eventforge[redis]'``); also re-exports the work store below.
``eventforge_ext.redis_streams``
    ``RedisWorkStore`` and ``RedisWorkQueue``: WorkQueue jobs in Redis Streams
    consumer groups (Redis >= 6.2); ``WorkQueue(store="redis://...")`` opens it.
``eventforge_ext.nats``
    ``NatsTransport``: a Transport over core NATS, RPC worker pools through
    queue groups (``pip install 'eventforge[nats]'``).
``eventforge_ext.logfire``
    ``LogfireMeter`` (a Logfire span per task call) and
    ``LogfireMetricLogger`` (meter measurements as Logfire metrics)
    (``pip install 'eventforge[logfire]'``).

``docs/adapters.md`` describes them: topic mapping, guarantees, and when to
choose Memory, TCP, Redis or NATS.

Adapters do not re-implement anything the core already has: they reuse its
topic matcher (the subscription trie, so ``*`` and ``**`` mean the same thing on
every transport), its wire codec (the same JSON messages as the TCP transport)
and its error classes.

The original package's import paths keep working: ``eventforge.transports.redis``,
``eventforge.transports.nats`` and ``eventforge.integrations.logfire`` are
aliases, resolved by ``eventforge.py``, for the modules of this package.
"""
