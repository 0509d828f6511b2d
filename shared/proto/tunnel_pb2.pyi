from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EnrollRequest(_message.Message):
    __slots__ = ("token", "node_info_json", "csr_pem")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NODE_INFO_JSON_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    token: str
    node_info_json: str
    csr_pem: bytes
    def __init__(self, token: _Optional[str] = ..., node_info_json: _Optional[str] = ..., csr_pem: _Optional[bytes] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("node_id", "node_secret", "cloud_public_key", "labels", "client_cert_pem")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_SECRET_FIELD_NUMBER: _ClassVar[int]
    CLOUD_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    node_secret: str
    cloud_public_key: bytes
    labels: _containers.ScalarMap[str, str]
    client_cert_pem: bytes
    def __init__(self, node_id: _Optional[str] = ..., node_secret: _Optional[str] = ..., cloud_public_key: _Optional[bytes] = ..., labels: _Optional[_Mapping[str, str]] = ..., client_cert_pem: _Optional[bytes] = ...) -> None: ...

class EdgeMessage(_message.Message):
    __slots__ = ("hello", "heartbeat", "observed", "records")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    heartbeat: Heartbeat
    observed: ObservedStateReport
    records: RecordBatch
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., observed: _Optional[_Union[ObservedStateReport, _Mapping]] = ..., records: _Optional[_Union[RecordBatch, _Mapping]] = ...) -> None: ...

class CloudMessage(_message.Message):
    __slots__ = ("welcome", "desired", "heartbeat_ack", "records_ack")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    DESIRED_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_ACK_FIELD_NUMBER: _ClassVar[int]
    RECORDS_ACK_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    desired: DesiredStatePush
    heartbeat_ack: HeartbeatAck
    records_ack: RecordsAck
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., desired: _Optional[_Union[DesiredStatePush, _Mapping]] = ..., heartbeat_ack: _Optional[_Union[HeartbeatAck, _Mapping]] = ..., records_ack: _Optional[_Union[RecordsAck, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("node_info_json", "applied_generation", "synced_seq", "epoch")
    NODE_INFO_JSON_FIELD_NUMBER: _ClassVar[int]
    APPLIED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    SYNCED_SEQ_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    node_info_json: str
    applied_generation: int
    synced_seq: int
    epoch: int
    def __init__(self, node_info_json: _Optional[str] = ..., applied_generation: _Optional[int] = ..., synced_seq: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("node_id", "server_time_ms", "synced_seq", "epoch")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    SYNCED_SEQ_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    server_time_ms: int
    synced_seq: int
    epoch: int
    def __init__(self, node_id: _Optional[str] = ..., server_time_ms: _Optional[int] = ..., synced_seq: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("seq", "sent_at_ms", "health_json")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_MS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_JSON_FIELD_NUMBER: _ClassVar[int]
    seq: int
    sent_at_ms: int
    health_json: str
    def __init__(self, seq: _Optional[int] = ..., sent_at_ms: _Optional[int] = ..., health_json: _Optional[str] = ...) -> None: ...

class HeartbeatAck(_message.Message):
    __slots__ = ("seq", "sent_at_ms", "server_time_ms")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_MS_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    sent_at_ms: int
    server_time_ms: int
    def __init__(self, seq: _Optional[int] = ..., sent_at_ms: _Optional[int] = ..., server_time_ms: _Optional[int] = ...) -> None: ...

class ObservedStateReport(_message.Message):
    __slots__ = ("observed_json",)
    OBSERVED_JSON_FIELD_NUMBER: _ClassVar[int]
    observed_json: str
    def __init__(self, observed_json: _Optional[str] = ...) -> None: ...

class DesiredStatePush(_message.Message):
    __slots__ = ("generation", "desired_json")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    DESIRED_JSON_FIELD_NUMBER: _ClassVar[int]
    generation: int
    desired_json: str
    def __init__(self, generation: _Optional[int] = ..., desired_json: _Optional[str] = ...) -> None: ...

class Record(_message.Message):
    __slots__ = ("seq", "kind", "topic", "ts_ms", "payload")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    TS_MS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    seq: int
    kind: str
    topic: str
    ts_ms: int
    payload: bytes
    def __init__(self, seq: _Optional[int] = ..., kind: _Optional[str] = ..., topic: _Optional[str] = ..., ts_ms: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class RecordBatch(_message.Message):
    __slots__ = ("records", "epoch", "live", "batch_id")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[Record]
    epoch: int
    live: bool
    batch_id: int
    def __init__(self, records: _Optional[_Iterable[_Union[Record, _Mapping]]] = ..., epoch: _Optional[int] = ..., live: _Optional[bool] = ..., batch_id: _Optional[int] = ...) -> None: ...

class RecordsAck(_message.Message):
    __slots__ = ("high_water_seq", "epoch", "refused", "batch_top", "batch_id")
    HIGH_WATER_SEQ_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    BATCH_TOP_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    high_water_seq: int
    epoch: int
    refused: int
    batch_top: int
    batch_id: int
    def __init__(self, high_water_seq: _Optional[int] = ..., epoch: _Optional[int] = ..., refused: _Optional[int] = ..., batch_top: _Optional[int] = ..., batch_id: _Optional[int] = ...) -> None: ...

class FetchArtifactRequest(_message.Message):
    __slots__ = ("sha256", "offset")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    offset: int
    def __init__(self, sha256: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("offset", "data", "total_size")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_size: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_size: _Optional[int] = ...) -> None: ...
