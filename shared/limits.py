"""The limits both sides enforce, defined once: the edge must never store what the cloud refuses.

The cloud checks these on every record batch and tunnel message; the edge checks the same
numbers before a record enters its outbox, so a refusal happens where the data arrives (with
the reason, dead-lettered and counted), never as a batch the cloud keeps refusing.
"""

from __future__ import annotations

MIB = 1024 * 1024

# One record's payload (a reading, a camera frame, a verdict, an event). Camera frames of a few
# megapixels compress to 1-4 MiB, so this is the edge's MQTT payload bound too.
MAX_RECORD_PAYLOAD_BYTES = 4 * MIB
# Records in one sync batch, and the batch's payload bytes the edge packs before sending.
MAX_BATCH_RECORDS = 10_000
MAX_BATCH_PAYLOAD_BYTES = 4 * MIB
# A record's topic as stored (MQTT allows 65,535 bytes; no plant topic comes near this).
MAX_TOPIC_CHARS = 512
# The record kinds the cloud stores.
RECORD_KINDS = frozenset({"telemetry", "verdict", "event"})

# gRPC messages on the tunnel, both directions: a batch at its bound plus framing fits.
MAX_TUNNEL_MESSAGE_BYTES = 16 * MIB
# JSON documents carried inside tunnel messages (hello, health, observed state).
MAX_TUNNEL_JSON_CHARS = 1 * MIB

# Images: decoded pixels of one frame (a decompression bomb stops here, not in RAM). One bound
# for every image the edge decodes, MQTT frame or /v1/inspect upload: RAM is the same either way.
MAX_IMAGE_PIXELS = 4096 * 4096
# What the inspection runtime takes in one request. Larger than a record on purpose: a payload
# posted to the gateway's /v1/inspect is never stored as a record (only its verdict is), so the
# cloud's record bound does not apply to it, and a model input sent as a JSON array (a
# 224x224x3 tensor is 150,528 values) is far larger than a sensor reading. MQTT frames reach
# the runtime only after the outbox took them, so they are within MAX_RECORD_PAYLOAD_BYTES.
MAX_INSPECT_PAYLOAD_BYTES = 16 * MIB
MAX_INSPECT_ARRAY_VALUES = 4_000_000
# Numeric values in one JSON reading or array payload.
MAX_READING_VALUES = 100_000
# A JSON reading's bytes (frames are bounded by MAX_RECORD_PAYLOAD_BYTES).
MAX_JSON_PAYLOAD_BYTES = 256 * 1024

# An LLM artifact's members, summed, as unpacked on the edge (and inspected at push): the
# largest checkpoint an edge box runs, with room. Free disk caps it further at unpack time.
MAX_LLM_UNPACKED_BYTES = 64 * 1024 * MIB
