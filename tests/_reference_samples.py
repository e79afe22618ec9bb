"""The code samples of the eventforge 0.1 reference README, copied verbatim as data.

The reference text is not part of the repository, so its samples live here:
``tests/test_reference_api.py`` runs each one unchanged in a fresh interpreter,
and other tests exec some of them in-process.  Keep them byte for byte as in
the reference (fixed ports, comments and all).
"""

SAMPLE_TRANSPORTS = '''\
from eventforge import MessageQueue
from eventforge.transports.tcp import TCPServerTransport

# in-process (default)
local = MessageQueue()

# cross-process: same MessageQueue API, different wire
transport = TCPServerTransport(host="127.0.0.1", port=9090)
transport.start()
networked = MessageQueue(transport=transport)

# broker-backed: same MessageQueue API again
from eventforge.transports.redis import RedisTransport
brokered = MessageQueue(transport=RedisTransport(host="localhost", port=6379))
'''

SAMPLE_MESSAGE_QUEUE = '''\
from eventforge import MessageQueue

queue = MessageQueue()

@queue.on("events.user")
def handle_event(message):
    print(f"Received: {message.topic} -> {message.payload}")

queue.publish("events.user", {"action": "login", "user": "alice"})
# Received: events.user -> {'action': 'login', 'user': 'alice'}

# Request-reply over the same queue
@queue.on("math.add")
def add_handler(message):
    a, b = message.payload["a"], message.payload["b"]
    queue.reply(message, a + b)

response = queue.request("math.add", {"a": 10, "b": 20}, timeout=5.0)
print(response.payload)  # 30
'''

SAMPLE_REMOTE_QUEUE = '''\
from eventforge import MessageQueue, RemoteQueue
from eventforge.transports.tcp import TCPServerTransport

# --- Worker: RECEIVES, so it listens on a port and subscribes locally. ---
# (TCPServerTransport must be .start()ed before use.)
worker_srv = TCPServerTransport(host="0.0.0.0", port=9001)
worker_srv.start()
worker = RemoteQueue("worker-1", local=MessageQueue(transport=worker_srv))

@worker.on("work")
def run(msg):
    print(f"worker got: {msg.payload}")

# --- Coordinator: only SENDS, so it needs no local queue at all. ---
coord = RemoteQueue("coordinator")
coord.connect("worker-1", host="127.0.0.1", port=9001)  # own a TCP link by address

coord.send("worker-1", "work", {"task": 42})  # push to one peer
# -> worker got: {'task': 42}

coord.broadcast("work", {"task": 99})          # push to ALL connected peers
print(coord.peers)                             # ['worker-1']
'''

SAMPLE_EXECUTOR = '''\
from eventforge import Executor, ExecutionMode

def heavy_task(n):
    return sum(range(n))

# Submit a job and fetch its TaskResult by id.
with Executor(mode=ExecutionMode.THREAD, max_workers=4) as executor:
    task_id = executor.submit(heavy_task, 1_000_000)
    result = executor.result(task_id)
    print(result.value)

# Process pool for CPU-bound work, mapped over an iterable.
with Executor(mode=ExecutionMode.PROCESS, max_workers=4) as executor:
    for r in executor.map(heavy_task, [100_000, 200_000, 300_000]):
        print(r.value)
'''

SAMPLE_RPC = '''\
from eventforge import MessageQueue, RPCServer, RPCClient

queue = MessageQueue()

# Server
server = RPCServer(queue, service_name="calculator")

@server.register()
def add(a: int, b: int) -> int:
    return a + b

@server.register()
def multiply(a: int, b: int) -> int:
    return a * b

server.serve(blocking=False)  # subscribe + return; True blocks the thread

# Client
client = RPCClient(queue, service_name="calculator")
print(client.call("add", 10, 20))   # 30
print(client.multiply(5, 6))        # 30 (dynamic method access)

server.stop()
'''

SAMPLE_TASK = '''\
from eventforge import (
    task, MessageQueue, Executor, ExecutionMode, TimingMeter
)

queue = MessageQueue()
executor = Executor(mode=ExecutionMode.THREAD)
timing = TimingMeter()

@task(
    queue=queue,             # pub-sub wiring (subscribe topic + publish result)
    topic="process.data",
    executor=executor,       # the Executor: local thread mode here
    on_execute=[timing],     # observers (cross-cutting)
    on_success=lambda ctx: print(f"Done: {ctx.result}"),
)
def process_data(data):
    return data.upper()

# Direct call -- runs locally through the Executor, returns the result.
result = process_data("hello")   # "HELLO"

# Queue trigger -- same execution path, same observers.
queue.publish("process.data", "world")

print(timing.stats)              # {'count': 2, 'avg': ..., ...}
'''

SAMPLE_TASK_RPC = '''\
from eventforge import task, MessageQueue, RPCServer, RPCClient, TimingMeter

# SERVER: define once, where it runs; @task adds observers around each call.
@task(on_execute=[TimingMeter()])
def predict(x):
    return x * 2

queue = MessageQueue()
server = RPCServer(queue, service_name="ml")
server.add_method("predict", predict)      # or @server.register("predict")
server.serve(blocking=False)

# CLIENT: plain, no @task, no stub.
client = RPCClient(queue, service_name="ml")
result = client.call("predict", 2)         # 4 -- runs predict ON the server, observers and all
'''

SAMPLE_OBSERVERS = '''\
from eventforge import task, TimingMeter, MetricsMeter, observe

timing = TimingMeter(threshold=1.0)  # alert if > 1s
metrics = MetricsMeter()

@task(on_execute=[timing, metrics])
def my_task(x):
    return x * 2

my_task(21)
my_task(42)

print(timing.stats)   # {'count': 2, 'avg': ..., 'min': ..., 'max': ...}
print(metrics.stats)  # {'calls': 2, 'successes': 2, 'failures': 0}

# Or @observe on any plain function:
@observe(timing, metrics)
def simple_function(x):
    return x + 1
'''

SAMPLE_TASK_REFERENCE = '''\
@task(
    queue=None,           # MessageQueue for pub-sub integration
    topic=None,           # topic name (defaults to function name)
    executor=None,        # Executor (default) -- how the body runs
                          #   in-process (inline / thread / process)
    on_execute=None,      # list of observers
    on_success=None,      # Callable[[TaskContext], None]
    on_failure=None,      # Callable[[TaskContext], None]
    on_complete=None,     # Callable[[TaskContext], None]
    publish_result=True,  # auto-publish to {topic}.success / {topic}.failure
    max_instances=None,   # concurrency cap (None = unlimited)
    instance_timeout=None,
)
def my_task(x): ...

my_task(21)               # direct call -> result
my_task.state            # SharedState across invocations
my_task.pool.stats       # TaskPool stats when max_instances is set
'''
