"""Regenerate the control-frame vectors: python tests/vectors/tcp/make_vectors.py [OUT_DIR]

The .bin files are exact frames (length prefix included); control.json lists
them with their topic and payload; auth.json holds an HMAC handshake example.
"""

import hashlib
import hmac
import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

CONTROL = [
    ("hello", "$hello", {"version": 1, "features": ["ack", "interest", "ping", "reply"],
                         "nonce": "11" * 32, "ping_interval": 5.0}),
    ("welcome-open", "$welcome", {"version": 1, "features": ["ack", "interest", "ping", "reply"],
                                  "auth": None, "max_frame_size": 1048576,
                                  "ping_interval": 15.0}),
    ("welcome-auth", "$welcome", {"version": 1, "features": ["ack", "interest", "ping", "reply"],
                                  "auth": "hmac-sha256", "max_frame_size": 1048576,
                                  "ping_interval": 15.0, "nonce": "22" * 32}),
    ("auth", "$auth", {"proof": "ab" * 32}),
    ("ready", "$ready", {"proof": "cd" * 32}),
    ("interest-add", "$interest", {"add": ["orders.*", "_reply.0a1b"]}),
    ("interest-remove", "$interest", {"remove": ["_reply.0a1b"]}),
    ("ack", "$ack", {"n": 64}),
    ("ping", "$ping", {}),
    ("pong", "$pong", {}),
    ("error-auth", "$error", {"code": "auth", "reason": "authentication failed: wrong secret"}),
    ("error-full", "$error", {"code": "full", "reason": "server is at max_connections"}),
    ("interest-remove-batch", "$interest", {"remove": ["_reply.0a1b", "_rpc_reply.2c3d"]}),
    ("hello-limits", "$hello", {"version": 1,
                                "features": ["ack", "flush", "interest", "ping", "reply"],
                                "nonce": "11" * 32, "ping_interval": 5.0,
                                "max_frame_size": 65536}),
    ("welcome-flush", "$welcome", {"version": 1,
                                   "features": ["ack", "flush", "interest", "ping", "reply"],
                                   "auth": None, "max_frame_size": 1048576,
                                   "ping_interval": 15.0}),
    ("flush", "$flush", {"id": 7}),
    ("flushed", "$flushed", {"id": 7}),
    ("error-frame-only", "$error", {"code": "protocol",
                                    "reason": "frame-only peers are refused here: send $hello "
                                              "first (allow_frame_only=False)"}),
]


def frame(topic, payload):
    body = json.dumps({"topic": topic, "payload": payload}, separators=(",", ":"),
                      ensure_ascii=False).encode()
    return struct.pack(">I", len(body)) + body


def main(out=HERE):
    listing = []
    for i, (name, topic, payload) in enumerate(CONTROL, 1):
        file = f"{i:02d}-{name}.bin"
        with open(os.path.join(out, file), "wb") as f:
            f.write(frame(topic, payload))
        listing.append({"name": name, "file": file, "topic": topic, "payload": payload})
    with open(os.path.join(out, "control.json"), "w") as f:
        json.dump(listing, f, indent=1)
        f.write("\n")
    secret, cn, sn = "correct horse battery staple", bytes(range(32)), bytes(range(32, 64))
    auth = {
        "secret": secret,
        "client_nonce": cn.hex(),
        "server_nonce": sn.hex(),
        "client_proof": hmac.new(secret.encode(), b"eventforge-v1 client" + cn + sn,
                                 hashlib.sha256).hexdigest(),
        "server_proof": hmac.new(secret.encode(), b"eventforge-v1 server" + sn + cn,
                                 hashlib.sha256).hexdigest(),
    }
    with open(os.path.join(out, "auth.json"), "w") as f:
        json.dump(auth, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:2])
