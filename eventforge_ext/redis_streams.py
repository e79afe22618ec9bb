"""RedisWorkStore and RedisWorkQueue: WorkQueue jobs kept in Redis Streams.

``pip install 'eventforge[redis]'`` installs the client (redis-py); it is
imported only when a store is opened.  ``WorkQueue(store="redis://host:6379/0")``
opens a :class:`RedisWorkStore`; :class:`RedisWorkQueue` is a WorkQueue on one.
Both are also importable from ``eventforge_ext.redis``.  Requires Redis 6.2
or newer (``XAUTOCLAIM``, ``XPENDING ... IDLE``); an older server is refused
with :class:`RedisVersionError` when the store opens.

How the WorkStore seam maps onto Streams (docs/workqueue.md has the long form):

* a topic is one stream; a WorkQueue consumer group is a Redis consumer group
  on it, so every group gets its own copy of each entry;
* a lease is a pending entry (PEL) of the group, owned by this store's
  consumer name; its delivery count is the job's attempt and, with the
  owner, its fencing token.  Ack, nack, extend and dead-letter are Lua
  scripts that first check, atomically, that the entry is still pending for
  this owner with this count; a stale holder changes nothing;
* the lease deadline is encoded in the entry's idle time: a claim sets it to
  ``HORIZON - lease`` (``XCLAIM ... IDLE``), so every expired lease, whatever
  its length, is one whose idle time reached ``HORIZON``, and one
  ``XAUTOCLAIM`` with that min-idle-time finds them all.  A process that
  starts therefore never takes a lease that is still running;
* extend is ``XCLAIM ... IDLE ... JUSTID`` (which does not count a delivery);
* a nacked job leaves the PEL (``XACK``) for a per-group sorted set of
  retries scored by due time; a claim takes due retries back with
  ``XCLAIM ... FORCE RETRYCOUNT attempt+1`` and new entries with
  ``XREADGROUP``;
* dead-lettering acks the job and adds the letter to the dead-letter topic's
  stream in one script; that topic's keys carry the same hash tag;
* trimming (``XTRIM MINID``) keeps every entry still pending, waiting for a
  retry, or not yet read by some group.

Every key of a topic (and of its ``.dead_letter`` topics) shares the hash
tag ``{topic}``, so each script touches one cluster slot.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import eventforge as ef

from ._broker import require

__all__ = [
    "MIN_REDIS_VERSION",
    "RedisVersionError",
    "RedisWorkStore",
    "RedisWorkQueue",
    "check_redis_version",
    "parse_redis_version",
]

MIN_REDIS_VERSION = (6, 2, 0)
DEFAULT_URL = "redis://localhost:6379/0"
DEFAULT_PREFIX = "eventforge:wq"
# Every lease ends when its entry's idle time reaches HORIZON (ms): a claim
# sets the idle time to HORIZON - lease.  Ten years is longer than any lease
# and shorter than the time since the epoch (a delivery time must be >= 0).
_HORIZON_MS = 10 * 365 * 24 * 3600 * 1000
_MAX_BLOCK = 2.0  # longest single XREAD BLOCK of a waiting claim (seconds)
_SWEEP_BATCH = 256  # expired leases taken over per group and sweep
_SWEEPER_SUFFIX = "~sweep"  # consumer name holding expired jobs while the queue decides
_ESCAPES = {"%": "%25", "{": "%7B", "}": "%7D", ":": "%3A"}


class RedisVersionError(ef.StoreError, RuntimeError):
    """The Redis server is older than the work store needs (6.2, for XAUTOCLAIM)."""


def parse_redis_version(text: Any) -> Tuple[int, ...]:
    """``"7.0.15"`` -> ``(7, 0, 15)``; missing parts are 0.  ValueError if unreadable."""
    found = re.match(r"\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(text))
    if found is None:
        raise ValueError(f"not a Redis version: {text!r}")
    return tuple(int(part or 0) for part in found.groups())


def check_redis_version(info: Mapping[str, Any], where: str = "the server") -> Tuple[int, ...]:
    """The version in an ``INFO server`` reply; RedisVersionError if below 6.2."""
    raw = info.get("redis_version")
    if raw is None:
        raise RedisVersionError(f"Redis at {where} did not report redis_version in INFO")
    version = parse_redis_version(raw)
    if version < MIN_REDIS_VERSION:
        need = ".".join(map(str, MIN_REDIS_VERSION[:2]))
        raise RedisVersionError(
            f"the Redis Streams work store needs Redis >= {need} (XAUTOCLAIM); "
            f"{where} runs {raw}")
    return version


def _escape(text: str) -> str:
    return "".join(_ESCAPES.get(ch, ch) for ch in text)


def _hash_tag(topic: str) -> str:
    """The cluster hash tag of a topic: a dead-letter topic shares its origin's."""
    while topic.endswith(ef.DEAD_LETTER_SUFFIX) and len(topic) > len(ef.DEAD_LETTER_SUFFIX):
        topic = topic[: -len(ef.DEAD_LETTER_SUFFIX)]
    return _escape(topic)


class _Keys:
    """The Redis keys of one topic (all in the slot of its hash tag)."""

    __slots__ = ("base", "stream", "meta", "groups", "signal")

    def __init__(self, prefix: str, topic: str) -> None:
        self.base = f"{prefix}:{{{_hash_tag(topic)}}}:{_escape(topic)}"
        self.stream = self.base + ":s"  # the jobs
        self.meta = self.base + ":m"  # counters: wait:<group>, dead:<group>
        self.groups = self.base + ":g"  # the consumer groups this store made
        self.signal = self.base + ":w"  # a one-entry stream: wakes waiting claims on nack

    def retry(self, group: str) -> str:
        """The sorted set of a group's nacked jobs, scored by due time (ms)."""
        return f"{self.base}:r:{_escape(group)}"


# -- the Lua scripts -------------------------------------------------------------------

_LUA_COMMON = """
local function now_ms(skew)
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + skew
end
local function held(s, g, id, c, token)
  local p = redis.call('XPENDING', s, g, id, id, 1)[1]
  return p ~= nil and p[2] == c and tonumber(p[4]) == token
end
local function add_job(s, meta, groups, default, body, lease, bound)
  local names = redis.call('SMEMBERS', groups)
  if #names == 0 then
    redis.pcall('XGROUP', 'CREATE', s, default, '$', 'MKSTREAM')
    redis.call('SADD', groups, default)
    names = {default}
  end
  if bound > 0 then
    for _, g in ipairs(names) do
      if tonumber(redis.call('HGET', meta, 'wait:' .. g) or 0) >= bound then
        return {'full', g}
      end
    end
  end
  local id
  if lease == '' then
    id = redis.call('XADD', s, '*', 'm', body)
  else
    id = redis.call('XADD', s, '*', 'm', body, 'v', lease)
  end
  for _, g in ipairs(names) do
    redis.call('HINCRBY', meta, 'wait:' .. g, 1)
  end
  return {'ok', id}
end
"""

# KEYS: stream, groups.  ARGV: group.
_ENSURE_GROUP = """
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 and redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '$', 'MKSTREAM')
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

# KEYS: stream, meta, groups.  ARGV: bound, default group, body, own lease ms or ''.
_ENQUEUE = _LUA_COMMON + """
return add_job(KEYS[1], KEYS[2], KEYS[3], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[1]))
"""

# KEYS: stream, meta, retry set, signal.
# ARGV: group, consumer, count, default lease ms, horizon ms, skew ms.
# Returns {entries, ms until the next retry is due (-1: none), last ids of stream, signal}.
_CLAIM = _LUA_COMMON + """
local s, meta, retry, signal = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local g, c = ARGV[1], ARGV[2]
local want, default = tonumber(ARGV[3]), tonumber(ARGV[4])
local horizon, skew = tonumber(ARGV[5]), tonumber(ARGV[6])
local now = now_ms(skew)
local out, taken = {}, 0
local function lease_of(fields)
  for i = 1, #fields, 2 do
    if fields[i] == 'v' then return tonumber(fields[i + 1]) end
  end
  return default
end
-- a retry is due within the clocks' millisecond resolution
for _, member in ipairs(redis.call('ZRANGEBYSCORE', retry, '-inf', now + 2, 'LIMIT', 0, want)) do
  redis.call('ZREM', retry, member)
  taken = taken + 1
  local bar = string.find(member, '|', 1, true)
  local id = string.sub(member, 1, bar - 1)
  local count = tonumber(string.sub(member, bar + 1)) + 1
  local entry = redis.call('XRANGE', s, id, id)[1]
  if entry then
    redis.call('XCLAIM', s, g, c, 0, id, 'IDLE', horizon - lease_of(entry[2]) - skew,
               'RETRYCOUNT', count, 'FORCE', 'JUSTID')
    out[#out + 1] = {id, count, entry[2]}
  end
end
if #out < want then
  local got = redis.call('XREADGROUP', 'GROUP', g, c, 'COUNT', want - #out, 'STREAMS', s, '>')
  if got then
    local by_lease = {}
    for _, entry in ipairs(got[1][2]) do
      local lease = lease_of(entry[2])
      if not by_lease[lease] then by_lease[lease] = {} end
      table.insert(by_lease[lease], entry[1])
      out[#out + 1] = {entry[1], 1, entry[2]}
      taken = taken + 1
    end
    for lease, ids in pairs(by_lease) do
      local args = {'XCLAIM', s, g, c, 0}
      for _, id in ipairs(ids) do args[#args + 1] = id end
      args[#args + 1] = 'IDLE'
      args[#args + 1] = horizon - lease - skew
      args[#args + 1] = 'JUSTID'
      redis.call(unpack(args))
    end
  end
end
if taken > 0 then redis.call('HINCRBY', meta, 'wait:' .. g, -taken) end
if #out > 0 then return {out, -1, '', ''} end
local due = -1
local first = redis.call('ZRANGE', retry, 0, 0, 'WITHSCORES')
if first[2] then due = math.max(0, tonumber(first[2]) - now) end
local last = redis.call('XREVRANGE', s, '+', '-', 'COUNT', 1)[1]
local wake = redis.call('XREVRANGE', signal, '+', '-', 'COUNT', 1)[1]
return {out, due, last and last[1] or '0-0', wake and wake[1] or '0-0'}
"""

# KEYS: stream.  ARGV: group, then (entry id, consumer, token) per lease.
_ACK = _LUA_COMMON + """
local out = {}
for i = 2, #ARGV, 3 do
  if held(KEYS[1], ARGV[1], ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])) then
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

# KEYS: stream, meta, retry set, signal.
# ARGV: group, entry id, consumer, token, attempts to record, delay ms, skew ms.
_NACK = _LUA_COMMON + """
local g, id = ARGV[1], ARGV[2]
if not held(KEYS[1], g, id, ARGV[3], tonumber(ARGV[4])) then return 0 end
redis.call('XACK', KEYS[1], g, id)
redis.call('ZADD', KEYS[3], now_ms(tonumber(ARGV[7])) + tonumber(ARGV[6]), id .. '|' .. ARGV[5])
redis.call('HINCRBY', KEYS[2], 'wait:' .. g, 1)
redis.call('XADD', KEYS[4], 'MAXLEN', 1, '*', 'g', g)
return 1
"""

# KEYS: stream.  ARGV: group, entry id, consumer, token, idle ms.
_EXTEND = _LUA_COMMON + """
if not held(KEYS[1], ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])) then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'IDLE', ARGV[5], 'JUSTID')
return 1
"""

# KEYS: stream, meta, letter stream, letter meta, letter groups.
# ARGV: group, entry id, consumer, token, default group, letter body, letter lease or ''.
_DEAD_LETTER = _LUA_COMMON + """
local g, id = ARGV[1], ARGV[2]
if not held(KEYS[1], g, id, ARGV[3], tonumber(ARGV[4])) then return 0 end
redis.call('XACK', KEYS[1], g, id)
redis.call('HINCRBY', KEYS[2], 'dead:' .. g, 1)
add_job(KEYS[3], KEYS[4], KEYS[5], ARGV[5], ARGV[6], ARGV[7], 0)
return 1
"""

# KEYS: stream, groups.  ARGV: sweeper consumer, min idle, hold idle, batch, sweeper suffix.
# Returns {group, entry id, attempt, fields} per expired lease taken over.
_SWEEP = """
local s, sweeper, min_idle, hold, batch, suffix =
  KEYS[1], ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local out = {}
for _, g in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local pending = redis.pcall('XPENDING', s, g, 'IDLE', min_idle, '-', '+', batch)
  if type(pending) == 'table' and pending.err == nil and #pending > 0 then
    local seen = {}
    for _, p in ipairs(pending) do seen[p[1]] = p end
    local claimed = redis.call('XAUTOCLAIM', s, g, sweeper, min_idle, '0-0', 'COUNT', batch,
                               'JUSTID')[2]
    for _, id in ipairs(claimed) do
      local p = seen[id]
      local attempt = p and tonumber(p[4]) or 1
      if p and string.sub(p[2], -#suffix) == suffix then attempt = attempt - 1 end
      if attempt < 1 then attempt = 1 end
      local entry = redis.call('XRANGE', s, id, id)[1]
      if entry then
        redis.call('XCLAIM', s, g, sweeper, 0, id, 'IDLE', hold, 'RETRYCOUNT', attempt + 1,
                   'JUSTID')
        out[#out + 1] = {g, id, attempt, entry[2]}
      else
        redis.call('XACK', s, g, id)
      end
    end
  end
end
return out
"""

# KEYS: stream, meta, then the retry set of each group.  ARGV: skew ms, then the groups.
# Returns {waiting, delayed, in flight, dead} per group.
_COUNTS = _LUA_COMMON + """
local now = now_ms(tonumber(ARGV[1]))
local out = {}
for i = 2, #ARGV do
  local g = ARGV[i]
  local pel = redis.pcall('XPENDING', KEYS[1], g)
  local in_flight = 0
  if type(pel) == 'table' and pel.err == nil then in_flight = pel[1] end
  out[#out + 1] = {
    tonumber(redis.call('HGET', KEYS[2], 'wait:' .. g) or 0),
    redis.call('ZCOUNT', KEYS[i + 1], '(' .. now, '+inf'),
    in_flight,
    tonumber(redis.call('HGET', KEYS[2], 'dead:' .. g) or 0)}
end
return out
"""

# KEYS: stream, groups, then the retry set of each group.
# ARGV: idle ms after which a consumer holding nothing is removed, then the groups.
# Returns the number of entries trimmed, or -1 when the groups changed meanwhile.
_TRIM = """
local s = KEYS[1]
if redis.call('SCARD', KEYS[2]) ~= #ARGV - 1 or redis.call('EXISTS', s) == 0 then return -1 end
local function parse(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
local floor, floor_ms, floor_seq = nil, 0, 0
local function keep(id)
  local ms, seq = parse(id)
  if floor == nil or ms < floor_ms or (ms == floor_ms and seq < floor_seq) then
    floor, floor_ms, floor_seq = id, ms, seq
  end
end
local known = {}
for _, info in ipairs(redis.call('XINFO', 'GROUPS', s)) do
  local name, last
  for j = 1, #info, 2 do
    if info[j] == 'name' then name = info[j + 1] end
    if info[j] == 'last-delivered-id' then last = info[j + 1] end
  end
  known[name] = true
  keep(last)
  local pel = redis.call('XPENDING', s, name)
  if pel[1] > 0 then keep(pel[2]) end
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', s, name)) do
    local cname, pending, idle
    for j = 1, #c, 2 do
      if c[j] == 'name' then cname = c[j + 1] end
      if c[j] == 'pending' then pending = c[j + 1] end
      if c[j] == 'idle' then idle = c[j + 1] end
    end
    if pending == 0 and idle > tonumber(ARGV[1]) then
      redis.call('XGROUP', 'DELCONSUMER', s, name, cname)
    end
  end
end
for i = 2, #ARGV do
  if not known[ARGV[i]] then return -1 end
end
for i = 3, #KEYS do
  for _, member in ipairs(redis.call('ZRANGE', KEYS[i], 0, -1)) do
    keep(string.sub(member, 1, string.find(member, '|', 1, true) - 1))
  end
end
if floor == nil then return 0 end
return redis.call('XTRIM', s, 'MINID', floor)
"""


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


def _field(fields: Sequence[Any], name: str) -> Any:
    for index in range(0, len(fields) - 1, 2):
        if _text(fields[index]) == name:
            return fields[index + 1]
    return None


class RedisWorkStore(ef.WorkStore):
    """A :class:`~eventforge.WorkStore` on Redis Streams consumer groups (Redis >= 6.2).

    ``RedisWorkStore("redis://host:6379/0")`` or ``RedisWorkStore(client=redis.Redis(...))``
    (a client passed in is never closed by the store); extra keyword arguments
    go to ``redis.Redis.from_url``.  Opening it checks the server version.

    * ``prefix`` starts every key (``<prefix>:{topic}:...``), so several
      applications, or tests, can share one server;
    * ``consumer`` names this store's Redis consumer (default: host, pid and
      a random part, new after ``fork()``), so leases of a process that
      restarts are never confused with the new process's.  A name given
      here must be unique among the live processes (fencing relies on it);
      a forked child appends its pid;
    * ``trim_interval`` seconds between two trims of a topic's stream (done
      by :meth:`sweep`); ``consumer_ttl`` seconds after which a consumer
      that holds nothing is removed from its group;
    * ``clock``: lease deadlines and retry delays run on the Redis server's
      clock.  A clock given here (tests) shifts the store's idea of "now"
      by however far it ran ahead of real time.

    Delivery is at-least-once: a job whose worker dies, or whose ack cannot
    reach Redis, is delivered again once its lease runs out.
    """

    def __init__(self, url: Optional[str] = None, *, client: Any = None,
                 prefix: str = DEFAULT_PREFIX, consumer: Optional[str] = None,
                 trim_interval: float = 5.0, consumer_ttl: float = 3600.0,
                 clock: Optional[Callable[[], float]] = None, **redis_options: Any) -> None:
        self._redis = redis = require("redis", "redis", "redis")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty str, not {prefix!r}")
        self._owns_client = client is None
        if client is None:
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            redis_options.setdefault("socket_connect_timeout", 5.0)
            redis_options.setdefault("socket_timeout", 30.0)
            # A script sent again after a lost reply could run twice: never retry.
            redis_options.setdefault("retry", Retry(NoBackoff(), 0))
            client = redis.Redis.from_url(url or DEFAULT_URL, **redis_options)
        self._client = client
        kwargs = client.connection_pool.connection_kwargs
        self.address = f"{kwargs.get('host', kwargs.get('path', '?'))}:{kwargs.get('port', '')}"
        self.prefix = prefix
        self.trim_interval = float(trim_interval)
        self.consumer_ttl = float(consumer_ttl)
        self._fixed_consumer = consumer
        self._opened_in = os.getpid()
        self._pid = -1
        self._consumer = ""
        self._clock = clock
        self._clock_start = clock() if clock is not None else 0.0
        self._real_start = time.monotonic()
        self._lock = threading.Lock()
        self._closed = False
        self._generation = 0  # bumped by wake()
        self._blocked: Dict[int, int] = {}  # Redis client id of a blocked claim -> its count
        self._idle_conns: List[Any] = []  # dedicated connections for blocking reads
        self._conn_pid = os.getpid()
        self._keys: Dict[str, _Keys] = {}
        self._ensured: set = set()  # (topic, group) pairs known to exist
        self._registered: set = set()  # topics added to the <prefix>:topics set
        self._trimmed: Dict[str, float] = {}
        self._scripts = {name: client.register_script(source) for name, source in (
            ("ensure", _ENSURE_GROUP), ("enqueue", _ENQUEUE), ("claim", _CLAIM),
            ("ack", _ACK), ("nack", _NACK), ("extend", _EXTEND),
            ("dead", _DEAD_LETTER), ("sweep", _SWEEP), ("counts", _COUNTS), ("trim", _TRIM))}
        try:
            info = self._call(lambda: client.info("server"))
            self.server_version = check_redis_version(info, self.address)
        except self._redis.exceptions.RedisError as exc:  # e.g. no such database number
            if self._owns_client:
                client.close()
            raise ef.StoreError(f"Redis at {self.address} refused the store: {exc}") from exc
        except BaseException:
            if self._owns_client:
                client.close()
            raise

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisWorkStore:
        """Open the store on the Redis server at ``url`` (``WorkQueue(store=url)`` calls this)."""
        return cls(url, **options)

    # -- helpers ----------------------------------------------------------------------

    @property
    def consumer(self) -> str:
        """This store's Redis consumer name (a new one in a forked child)."""
        pid = os.getpid()
        if pid != self._pid:
            self._pid = pid
            if self._fixed_consumer is None:
                self._consumer = f"{socket.gethostname()}-{pid}-{secrets.token_hex(4)}"
            else:  # a forked child must not pass for its parent
                self._consumer = self._fixed_consumer if pid == self._opened_in else (
                    f"{self._fixed_consumer}-{pid}")
        return self._consumer

    def _skew_ms(self) -> int:
        if self._clock is None:
            return 0
        ahead = (self._clock() - self._clock_start) - (time.monotonic() - self._real_start)
        return int(round(ahead * 1000))

    def _now(self) -> float:
        return time.time() + self._skew_ms() / 1000.0

    def _topic_keys(self, topic: str) -> _Keys:
        keys = self._keys.get(topic)
        if keys is None:
            keys = self._keys[topic] = _Keys(self.prefix, topic)
        return keys

    def _call(self, thunk: Callable[[], Any]) -> Any:
        try:
            return thunk()
        except self._redis.exceptions.ConnectionError as exc:
            raise ef.ConnectionLostError(f"Redis at {self.address}: {exc}") from exc
        except self._redis.exceptions.TimeoutError as exc:
            raise ef.ConnectionLostError(f"Redis at {self.address} timed out: {exc}") from exc

    def _run(self, name: str, keys: List[str], args: List[Any]) -> Any:
        script = self._scripts[name]
        return self._call(lambda: script(keys=keys, args=args))

    def _members(self, key: str) -> List[str]:
        return sorted(_text(name) for name in self._call(lambda: self._client.smembers(key)))

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the Redis work store is closed")

    def _register(self, topic: str) -> None:
        if topic not in self._registered:
            self._call(lambda: self._client.sadd(f"{self.prefix}:topics", topic))
            self._registered.add(topic)

    @staticmethod
    def _lease_ms(seconds: float) -> int:
        ms = int(round(seconds * 1000))
        if not 0 <= ms < _HORIZON_MS // 2:
            raise ValueError(f"a lease must last between 0 and {_HORIZON_MS // 2000} s, "
                             f"not {seconds!r} s")
        return ms

    def _own_lease(self, message: ef.Message) -> str:
        own = message.headers.get(ef._WQ_VISIBILITY)
        return str(self._lease_ms(float(own))) if own else ""

    def _lease(self, topic: str, group: str, entry_id: str, consumer: str, token: int,
               attempt: int, body: Any, lease_seconds: float) -> ef.Lease:
        message = ef.decode(body.encode("utf-8") if isinstance(body, str) else body)
        return ef.Lease(topic, group, message.id, token, attempt, message,
                        self._now() + lease_seconds, (entry_id, consumer))

    # -- the seam ---------------------------------------------------------------------

    def ensure_group(self, topic: str, group: str) -> None:
        self._check_open()
        if (topic, group) in self._ensured:
            return
        keys = self._topic_keys(topic)
        self._register(topic)
        self._run("ensure", [keys.stream, keys.groups], [group])
        self._ensured.add((topic, group))

    def enqueue(self, topic: str, message: ef.Message, *, max_pending: int = 0) -> str:
        self._check_open()
        keys = self._topic_keys(topic)
        self._register(topic)
        body = ef.encode(message)[4:]
        result = self._run("enqueue", [keys.stream, keys.meta, keys.groups],
                           [max_pending, ef.DEFAULT_CONSUMER_GROUP, body,
                            self._own_lease(message)])
        if _text(result[0]) == "full":
            raise ef.QueueFullError(
                f"work queue {topic!r} (group {_text(result[1])!r}) holds "
                f"max_work_queue_size={max_pending} waiting jobs")
        return message.id

    def claim(self, topic: str, group: str, lease_seconds: float, *, max_count: int = 1,
              wait: Optional[float] = 0.0) -> List[ef.Lease]:
        self._check_open()
        default_ms = self._lease_ms(lease_seconds)
        keys = self._topic_keys(topic)
        generation = self._generation
        end = None if wait is None else time.monotonic() + wait
        while True:
            leases, due_ms, last_ids = self._claim_once(keys, topic, group, default_ms,
                                                        max_count)
            if leases:
                return leases
            if self._closed or generation != self._generation:
                return []
            left = _MAX_BLOCK if end is None else end - time.monotonic()
            if left <= 0:
                return []
            if due_ms >= 0:
                left = min(left, due_ms / 1000.0)
            self._block(keys, last_ids, min(left, _MAX_BLOCK), generation)

    def _claim_once(self, keys: _Keys, topic: str, group: str, default_ms: int,
                    max_count: int) -> Tuple[List[ef.Lease], int, Tuple[str, str]]:
        consumer = self.consumer
        args = [group, consumer, max_count, default_ms, _HORIZON_MS, self._skew_ms()]
        script_keys = [keys.stream, keys.meta, keys.retry(group), keys.signal]
        self.ensure_group(topic, group)
        try:
            result = self._run("claim", script_keys, args)
        except self._redis.exceptions.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The group vanished (a Redis restart without persistence): make it again.
            self._ensured.discard((topic, group))
            self._registered.discard(topic)
            self.ensure_group(topic, group)
            result = self._run("claim", script_keys, args)
        entries, due_ms = result[0], int(result[1])
        leases = []
        for entry_id, count, fields in entries:
            own = _field(fields, "v")
            seconds = int(own) / 1000.0 if own is not None else default_ms / 1000.0
            try:
                leases.append(self._lease(topic, group, _text(entry_id), consumer, int(count),
                                          int(count), _field(fields, "m"), seconds))
            except (ef.FrameError, AttributeError) as exc:
                ef.logger.error("redis work store: entry %s of %r is not a job (%s); "
                                "acknowledged and dropped", _text(entry_id), topic, exc)
                self._run("ack", [keys.stream], [group, _text(entry_id), consumer, int(count)])
        return leases, due_ms, (_text(result[2]), _text(result[3]))

    def _block(self, keys: _Keys, last_ids: Tuple[str, str], seconds: float,
               generation: int) -> None:
        """Wait until the stream or the signal stream grows, wake(), or ``seconds``."""
        conn = self._take_connection()
        client_id: Optional[int] = None
        try:
            conn.send_packed_command(conn.pack_commands([
                ("CLIENT", "ID"),
                ("XREAD", "BLOCK", max(1, int(seconds * 1000)), "STREAMS", keys.stream,
                 keys.signal, last_ids[0], last_ids[1]),
            ]))
            client_id = int(conn.read_response())
            with self._lock:
                self._blocked[client_id] = self._blocked.get(client_id, 0) + 1
                woken = generation != self._generation or self._closed
            if woken:
                self._unblock(client_id)
            conn.read_response()
        except Exception as exc:
            conn.disconnect()
            conn = None
            if self._closed:
                return
            if isinstance(exc, (self._redis.exceptions.ConnectionError,
                                self._redis.exceptions.TimeoutError)):
                raise ef.ConnectionLostError(f"Redis at {self.address}: {exc}") from exc
            raise
        finally:
            if client_id is not None:
                with self._lock:
                    left = self._blocked.pop(client_id, 1) - 1
                    if left > 0:
                        self._blocked[client_id] = left
            if conn is not None:
                self._give_back(conn)

    def _take_connection(self) -> Any:
        with self._lock:
            if self._conn_pid != os.getpid():  # forked: the parent's sockets are not ours
                self._conn_pid = os.getpid()
                self._idle_conns = []
                self._blocked.clear()
            if self._idle_conns:
                return self._idle_conns.pop()
        pool = self._client.connection_pool
        options: Dict[str, Any] = dict(pool.connection_kwargs)
        for key in [key for key in options if key.startswith("maint_notifications")]:
            del options[key]  # redis-py 7+: RESP3-only settings
        options["socket_timeout"] = _MAX_BLOCK + 10.0
        return pool.connection_class(**options)

    def _give_back(self, conn: Any) -> None:
        with self._lock:
            if not self._closed:
                self._idle_conns.append(conn)
                return
        conn.disconnect()

    def _unblock(self, client_id: int) -> None:
        try:
            self._client.execute_command("CLIENT", "UNBLOCK", client_id)
        except Exception:  # the claim times out by itself
            pass

    # A lease this store settled (ack, nack, dead-letter) has its handle
    # cleared: the same consumer may get the entry again with the same
    # delivery count (a job released unseen), and the old Lease object must
    # not pass for the new one.

    def _fenced(self, name: str, keys: List[str], args: List[Any]) -> bool:
        try:
            return bool(self._run(name, keys, args))
        except self._redis.exceptions.ResponseError as exc:
            if "NOGROUP" in str(exc):
                return False  # the group is gone, and the lease with it
            raise

    def ack(self, lease: ef.Lease) -> bool:
        return self.ack_all([lease])[0]

    def ack_all(self, leases: List[ef.Lease]) -> List[bool]:
        results: List[bool] = [False] * len(leases)
        batches: Dict[Tuple[str, str], List[int]] = {}
        for index, lease in enumerate(leases):
            batches.setdefault((lease.topic, lease.group), []).append(index)
        for (topic, group), indexes in batches.items():
            indexes = [index for index in indexes if leases[index].handle is not None]
            if not indexes:
                continue
            args: List[Any] = [group]
            for index in indexes:
                entry_id, consumer = leases[index].handle
                args += [entry_id, consumer, leases[index].token]
            try:
                acked = self._run("ack", [self._topic_keys(topic).stream], args)
            except self._redis.exceptions.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                continue
            for index, done in zip(indexes, acked):
                if done:
                    results[index] = True
                    leases[index].handle = None
        return results

    def nack(self, lease: ef.Lease, delay: float = 0.0, *, count_attempt: bool = True) -> bool:
        if lease.handle is None:
            return False
        keys = self._topic_keys(lease.topic)
        entry_id, consumer = lease.handle
        attempts = lease.attempt if count_attempt else lease.attempt - 1
        if self._fenced("nack", [keys.stream, keys.meta, keys.retry(lease.group), keys.signal],
                        [lease.group, entry_id, consumer, lease.token, max(attempts, 0),
                         int(delay * 1000), self._skew_ms()]):
            lease.handle = None
            return True
        return False

    def extend(self, lease: ef.Lease, lease_seconds: float) -> bool:
        if lease.handle is None:
            return False
        keys = self._topic_keys(lease.topic)
        entry_id, consumer = lease.handle
        idle = _HORIZON_MS - self._lease_ms(lease_seconds) - self._skew_ms()
        if self._fenced("extend", [keys.stream],
                        [lease.group, entry_id, consumer, lease.token, idle]):
            lease.deadline = self._now() + lease_seconds
            return True
        return False

    def dead_letter(self, lease: ef.Lease, topic: str, message: ef.Message) -> bool:
        if lease.handle is None:
            return False
        keys = self._topic_keys(lease.topic)
        letter = self._topic_keys(topic)
        self._register(topic)
        entry_id, consumer = lease.handle
        if self._fenced(
                "dead", [keys.stream, keys.meta, letter.stream, letter.meta, letter.groups],
                [lease.group, entry_id, consumer, lease.token, ef.DEFAULT_CONSUMER_GROUP,
                 ef.encode(message)[4:], self._own_lease(message)]):
            lease.handle = None
            return True
        return False

    def sweep(self, hold_seconds: float) -> List[ef.Lease]:
        self._check_open()
        sweeper = self.consumer + _SWEEPER_SUFFIX
        skew = self._skew_ms()
        hold_idle = _HORIZON_MS - self._lease_ms(hold_seconds) - skew
        expired = []
        for topic in list(self._keys):
            keys = self._keys[topic]
            rows = self._run("sweep", [keys.stream, keys.groups],
                             [sweeper, _HORIZON_MS - skew, hold_idle, _SWEEP_BATCH,
                              _SWEEPER_SUFFIX])
            for group, entry_id, attempt, fields in rows:
                try:
                    expired.append(self._lease(topic, _text(group), _text(entry_id), sweeper,
                                               int(attempt) + 1, int(attempt),
                                               _field(fields, "m"), hold_seconds))
                except (ef.FrameError, AttributeError):
                    ef.logger.error("redis work store: entry %s of %r is not a job",
                                    _text(entry_id), topic)
            self._maybe_trim(topic, keys)
        return expired

    def _maybe_trim(self, topic: str, keys: _Keys) -> None:
        now = time.monotonic()
        if now - self._trimmed.get(topic, -1e9) < self.trim_interval:
            return
        self._trimmed[topic] = now
        self.trim(topic)

    def trim(self, topic: str) -> int:
        """Drop the entries of ``topic`` that no group needs any more; returns how many.

        Kept: everything still pending, waiting for a retry, or not yet read
        by some group.  :meth:`sweep` calls this every ``trim_interval``.
        """
        keys = self._topic_keys(topic)
        groups = self._members(keys.groups)
        if not groups:
            return 0
        trimmed = self._run("trim", [keys.stream, keys.groups] + [keys.retry(g) for g in groups],
                            [int(self.consumer_ttl * 1000)] + groups)
        return max(0, int(trimmed))

    def counts(self, topic: Optional[str] = None, group: Optional[str] = None) -> Dict[str, int]:
        totals = {"ready": 0, "delayed": 0, "in_flight": 0, "dead": 0}
        if topic is None:
            topics = self._members(f"{self.prefix}:topics")
        else:
            topics = [topic]
        for name in topics:
            keys = self._topic_keys(name)
            if group is None:
                groups = self._members(keys.groups)
            else:
                groups = [group]
            if not groups:
                continue
            rows = self._run("counts", [keys.stream, keys.meta] + [keys.retry(g) for g in groups],
                             [self._skew_ms()] + groups)
            for waiting, delayed, in_flight, dead in rows:
                waiting, delayed = max(0, int(waiting)), int(delayed)
                totals["ready"] += max(0, waiting - delayed)
                totals["delayed"] += min(delayed, waiting)
                totals["in_flight"] += int(in_flight)
                totals["dead"] += int(dead)
        return totals

    def wake(self) -> None:
        with self._lock:
            self._generation += 1
            blocked = list(self._blocked)
        for client_id in blocked:
            self._unblock(client_id)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.wake()
        with self._lock:
            idle, self._idle_conns = self._idle_conns, []
        for conn in idle:
            conn.disconnect()
        if self._owns_client:
            self._client.close()

    def __repr__(self) -> str:
        return (f"<RedisWorkStore {self.address} prefix={self.prefix!r}"
                f"{' closed' if self._closed else ''}>")


class RedisWorkQueue(ef.WorkQueue):
    """A :class:`~eventforge.WorkQueue` whose jobs live in Redis Streams.

    ``RedisWorkQueue("redis://host:6379/0", max_retries=5)`` is
    ``WorkQueue(store=RedisWorkStore(url), max_retries=5)``: the keyword
    arguments ``client``, ``prefix``, ``consumer``, ``trim_interval`` and
    ``consumer_ttl`` go to the :class:`RedisWorkStore`, the rest to
    WorkQueue.  Pub-sub (``publish``/``subscribe``) stays on ``transport``
    (in-process by default); only jobs go through Redis.
    """

    def __init__(self, url: Optional[str] = None, transport: Optional[ef.Transport] = None, *,
                 client: Any = None, prefix: str = DEFAULT_PREFIX,
                 consumer: Optional[str] = None, trim_interval: float = 5.0,
                 consumer_ttl: float = 3600.0, **options: Any) -> None:
        store = RedisWorkStore(url, client=client, prefix=prefix, consumer=consumer,
                               trim_interval=trim_interval, consumer_ttl=consumer_ttl)
        try:
            super().__init__(transport, store=store, **options)
        except BaseException:
            store.close()
            raise

