"""Write the wire-format test vectors under tests/vectors/ (kept for maintainers).

    python tests/make_vectors.py            # rewrite tests/vectors/
    python tests/make_vectors.py OUT_DIR    # write them somewhere else

Every frame body below is spelled out by hand as the exact JSON text, rather
than produced by eventforge's encoder, so the vectors pin the wire format
independently of the implementation they check.  ``tests/test_vectors.py``
checks eventforge against them in both directions and checks that this script
reproduces the checked-in files byte for byte.  docs/protocol.md describes the
manifest format.

Changing a vector changes the wire format: do it only together with
docs/protocol.md, and expect every port to follow.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Optional

DEFAULT_MAX_FRAME_SIZE = 1024 * 1024
SMALL_MAX_FRAME_SIZE = 256

ID = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b"
REQUEST_ID = "0e9d8c7b-6a59-4483-b221-0f1e2d3c4b5a"


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def _message(
    topic: str,
    payload: Any = None,
    *,
    id: Optional[str] = ID,  # noqa: A002 - the wire field is called "id"
    headers: Optional[Dict[str, Any]] = None,
    timestamp: Optional[str] = "2024-05-01T12:00:00Z",
    reply_to: Optional[str] = None,
    correlation_id: Optional[str] = None,
) -> Dict[str, Any]:
    """The expected message as its wire dict; a None id/timestamp means 'generated'."""
    message: Dict[str, Any] = {}
    if id is not None:
        message["id"] = id
    message.update(topic=topic, payload=payload, headers=headers or {})
    if timestamp is not None:
        message["timestamp"] = timestamp
    message.update(reply_to=reply_to, correlation_id=correlation_id)
    return message


def _padded_body(size: int) -> str:
    head = f'{{"id":"{ID}","topic":"size.check","payload":"'
    tail = (
        '","headers":{},"timestamp":"2024-05-01T12:00:00Z","reply_to":null,"correlation_id":null}'
    )
    return head + "x" * (size - len(head) - len(tail)) + tail


def vectors() -> List[Dict[str, Any]]:
    """Return the vectors: name, frame bytes, expectation and note."""
    accepted: List[Dict[str, Any]] = [
        dict(
            name="minimal",
            body='{"topic":"greeting"}',
            message=_message("greeting", id=None, timestamp=None),
            encode=False,
            note="Only the topic: payload null, headers {}, reply_to and correlation_id "
            "null; the receiver generates id and timestamp.",
        ),
        dict(
            name="canonical",
            body=f'{{"id":"{ID}","topic":"orders.created","payload":{{"order":1,"item":"book"}},'
            '"headers":{"source":"shop"},"timestamp":"2024-05-01T12:00:00Z",'
            '"reply_to":null,"correlation_id":null}',
            message=_message("orders.created", {"order": 1, "item": "book"},
                             headers={"source": "shop"}),
            encode=True,
            note="All seven fields in the canonical order, compact separators, "
            "timestamp without fraction because microseconds are zero.",
        ),
        dict(
            name="unicode",
            body=f'{{"id":"{ID}","topic":"café.\U0001f389.e\u0301","payload":'
            '"Grüße \U0001f600 \U0001d11e e\u0301 漢字",'
            '"headers":{"ключ":"值"},"timestamp":"2024-05-01T12:00:00Z",'
            '"reply_to":null,"correlation_id":null}',
            message=_message("café.\U0001f389.e\u0301", "Grüße \U0001f600 \U0001d11e e\u0301 漢字",
                             headers={"ключ": "值"}),
            encode=True,
            note="Non-ASCII text is sent as raw UTF-8, never \\u-escaped: a topic segment "
            "with an emoji and a combining accent, non-BMP characters (U+1F600, "
            "U+1D11E) in the payload, Cyrillic/CJK header.",
        ),
        dict(
            name="escapes",
            body=f'{{"id":"{ID}","topic":"text.escapes","payload":'
            '"quote \\" backslash \\\\ slash / newline \\n tab \\t nul \\u0000 '
            'unit-sep \\u001f del \x7f",'
            '"headers":{},"timestamp":"2024-05-01T12:00:00Z",'
            '"reply_to":null,"correlation_id":null}',
            message=_message(
                "text.escapes",
                'quote " backslash \\ slash / newline \n tab \t nul \x00 unit-sep \x1f del \x7f',
            ),
            encode=True,
            note="JSON string escapes: quote and backslash escaped, \\n and \\t short "
            "forms, other C0 controls as \\u00XX (lower-case hex); '/' and DEL are "
            "not escaped.",
        ),
        dict(
            name="empty-payload-and-headers",
            body=f'{{"id":"{ID}","topic":"empty","payload":{{}},"headers":{{}},'
            '"timestamp":"2024-05-01T12:00:00Z","reply_to":null,"correlation_id":null}',
            message=_message("empty", {}),
            encode=True,
            note="An empty object payload and empty headers.",
        ),
        dict(
            name="null-payload",
            body=f'{{"id":"{ID}","topic":"ping","payload":null,"headers":{{}},'
            '"timestamp":"2024-05-01T12:00:00Z","reply_to":null,"correlation_id":null}',
            message=_message("ping", None),
            encode=True,
            note="A null payload is written out, not omitted.",
        ),
        dict(
            name="nested-payload",
            body=f'{{"id":"{ID}","topic":"data.nested","payload":'
            '{"list":[1,-2,0.5,-2.25,true,false,null,"s"],'
            '"deep":{"a":{"b":{"c":[[],{},[{}]]}}},"max_safe_int":9007199254740991},'
            '"headers":{"trace":{"span":[1,2]}},"timestamp":"2024-05-01T12:00:00Z",'
            '"reply_to":null,"correlation_id":null}',
            message=_message(
                "data.nested",
                {
                    "list": [1, -2, 0.5, -2.25, True, False, None, "s"],
                    "deep": {"a": {"b": {"c": [[], {}, [{}]]}}},
                    "max_safe_int": 9007199254740991,
                },
                headers={"trace": {"span": [1, 2]}},
            ),
            encode=True,
            note="Nested objects and arrays of every JSON type, key order preserved, "
            "and nested header values.",
        ),
        dict(
            name="request-reply-fields",
            body=f'{{"id":"{REQUEST_ID}","topic":"math.add","payload":{{"a":1,"b":2}},'
            '"headers":{},"timestamp":"2024-05-01T12:00:00.123456Z",'
            f'"reply_to":"_reply.{REQUEST_ID}","correlation_id":"{REQUEST_ID}"}}',
            message=_message(
                "math.add", {"a": 1, "b": 2}, id=REQUEST_ID,
                timestamp="2024-05-01T12:00:00.123456Z",
                reply_to=f"_reply.{REQUEST_ID}", correlation_id=REQUEST_ID,
            ),
            encode=True,
            note="reply_to and correlation_id set; a timestamp with microseconds "
            "(always six digits when not zero).",
        ),
        dict(
            name="numeric-timestamp",
            body=f'{{"id":"{ID}","topic":"metrics.cpu","payload":0.75,'
            '"timestamp":1714564800.25}',
            message=_message("metrics.cpu", 0.75, timestamp="2024-05-01T12:00:00.250000Z"),
            encode=False,
            note="A numeric timestamp is seconds since the Unix epoch (UTC); missing "
            "headers/reply_to/correlation_id take their defaults. Encoders always "
            "write the ISO form.",
        ),
        dict(
            name="offset-timestamp",
            body=f'{{"id":"{ID}","topic":"clock.local","timestamp":"2024-05-01T14:00:00+02:00"}}',
            message=_message("clock.local", timestamp="2024-05-01T12:00:00Z"),
            encode=False,
            note="An ISO 8601 timestamp with a UTC offset denotes the same instant as "
            "its UTC form; compare timestamps as instants.",
        ),
        dict(
            name="unknown-keys",
            body=f'{{"id":"{ID}","topic":"a.b","payload":1,"priority":5,'
            '"meta":{"x":[1]},"timestamp":"2024-05-01T12:00:00Z"}',
            message=_message("a.b", 1),
            encode=False,
            note="Keys that are not message fields are ignored.",
        ),
        dict(
            name="max-size",
            body=_padded_body(SMALL_MAX_FRAME_SIZE),
            message=_message("size.check", "x" * (SMALL_MAX_FRAME_SIZE - len(_padded_body(0)))),
            max_frame_size=SMALL_MAX_FRAME_SIZE,
            encode=True,
            note="A body of exactly max_frame_size bytes (256 here) is accepted.",
        ),
    ]
    refused: List[Dict[str, Any]] = [
        dict(
            name="over-max-size",
            body=_padded_body(SMALL_MAX_FRAME_SIZE + 1),
            error="FrameTooLargeError",
            connection="closed",
            max_frame_size=SMALL_MAX_FRAME_SIZE,
            source_message=_message(
                "size.check", "x" * (SMALL_MAX_FRAME_SIZE + 1 - len(_padded_body(0)))
            ),
            note="One byte over max_frame_size: refused as soon as the length prefix is "
            "read, before any body byte is buffered; the connection is closed. An "
            "encoder with the same limit refuses source_message.",
        ),
        dict(
            name="invalid-utf8",
            body=b'{"topic":"a","payload":"\xff\xfe"}',
            error="FrameError",
            note="The body is not valid UTF-8.",
        ),
        dict(
            name="invalid-json",
            body='{"topic":"a","payload":',
            error="FrameError",
            note="The body is not valid JSON (truncated).",
        ),
        dict(
            name="nan-literal",
            body='{"topic":"a","payload":NaN}',
            error="FrameError",
            note="NaN, Infinity and -Infinity are not JSON.",
        ),
        dict(
            name="non-object",
            body='["a","b"]',
            error="FrameError",
            note="The body is JSON but not an object.",
        ),
        dict(
            name="missing-topic",
            body='{"payload":1}',
            error="FrameError",
            note="There is no topic (a null topic counts as missing).",
        ),
        dict(
            name="invalid-topic",
            body='{"topic":"a..b","payload":1}',
            error="FrameError",
            note="The topic has an empty segment.",
        ),
        dict(
            name="wildcard-topic",
            body='{"topic":"orders.*","payload":1}',
            error="FrameError",
            note="A message topic may not contain wildcards.",
        ),
        dict(
            name="bad-headers",
            body='{"topic":"a","headers":["x"]}',
            error="FrameError",
            note="headers must be an object (or null/absent).",
        ),
        dict(
            name="impossible-timestamp",
            body='{"topic":"a","timestamp":"2023-02-29T00:00:00Z"}',
            error="FrameError",
            note="A timestamp that names no real instant (2023 is not a leap year).",
        ),
        dict(
            name="length-prefix-max",
            frame=b"\xff\xff\xff\xff",
            error="FrameTooLargeError",
            connection="closed",
            note="Length prefix 2^32-1 with no body: refused at once, no allocation "
            "sized by it, connection closed.",
        ),
        dict(
            name="timestamp-past-year-9999",
            body='{"topic":"a","timestamp":"9999-12-31T23:59:59-01:00"}',
            error="FrameError",
            note="Every field is in range, but the instant in UTC is in year 10000: "
            "outside the years 1-9999, so refused at decode.",
        ),
    ]
    result = []
    for number, vector in enumerate(accepted + refused, start=1):
        body = vector.pop("body", None)
        if isinstance(body, str):
            body = body.encode("utf-8")
        frame = vector.pop("frame", None) or _frame(body)
        entry: Dict[str, Any] = {
            "name": vector["name"],
            "file": f"{number:02d}-{vector['name']}.bin",
            "max_frame_size": vector.get("max_frame_size", DEFAULT_MAX_FRAME_SIZE),
        }
        if "error" in vector:
            entry["error"] = vector["error"]
            entry["connection"] = vector.get("connection", "kept")
            if "source_message" in vector:
                entry["source_message"] = vector["source_message"]
        else:
            entry["message"] = vector["message"]
            entry["encode"] = vector["encode"]
        entry["note"] = vector["note"]
        result.append({"entry": entry, "frame": frame})
    return result


def write(out_dir: str) -> List[str]:
    """Write every vector file and manifest.json into ``out_dir``; return the file names."""
    os.makedirs(out_dir, exist_ok=True)
    entries = []
    names = []
    for vector in vectors():
        entry = vector["entry"]
        with open(os.path.join(out_dir, entry["file"]), "wb") as f:
            f.write(vector["frame"])
        entries.append(entry)
        names.append(entry["file"])
    manifest = {
        "description": "eventforge wire-format test vectors; see docs/protocol.md",
        "frame": "4-byte unsigned big-endian body length, then the UTF-8 JSON body",
        "vectors": entries,
    }
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8", newline="\n") as f:
        json.dump(manifest, f, ensure_ascii=True, indent=2)
        f.write("\n")
    names.append("manifest.json")
    return names


def main(argv: List[str]) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    out_dir = argv[0] if argv else os.path.join(here, "vectors")
    for name in write(out_dir):
        print(os.path.join(out_dir, name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
