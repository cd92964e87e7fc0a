from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StoreLookupRequest(_message.Message):
    __slots__ = ("namespace", "engine_id", "hashes")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    engine_id: str
    hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, namespace: _Optional[str] = ..., engine_id: _Optional[str] = ..., hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class StoreHit(_message.Message):
    __slots__ = ("hash", "offset", "checksum", "token_ids")
    HASH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    hash: int
    offset: int
    checksum: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, hash: _Optional[int] = ..., offset: _Optional[int] = ..., checksum: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class StoreLookupResponse(_message.Message):
    __slots__ = ("hits", "segment", "tag", "lease_seconds")
    HITS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[StoreHit]
    segment: str
    tag: str
    lease_seconds: float
    def __init__(self, hits: _Optional[_Iterable[_Union[StoreHit, _Mapping]]] = ..., segment: _Optional[str] = ..., tag: _Optional[str] = ..., lease_seconds: _Optional[float] = ...) -> None: ...

class StoreBlock(_message.Message):
    __slots__ = ("hash", "token_ids")
    HASH_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    hash: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, hash: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class StoreReserveRequest(_message.Message):
    __slots__ = ("namespace", "engine_id", "block_bytes", "blocks")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    engine_id: str
    block_bytes: int
    blocks: _containers.RepeatedCompositeFieldContainer[StoreBlock]
    def __init__(self, namespace: _Optional[str] = ..., engine_id: _Optional[str] = ..., block_bytes: _Optional[int] = ..., blocks: _Optional[_Iterable[_Union[StoreBlock, _Mapping]]] = ...) -> None: ...

class StoreSlot(_message.Message):
    __slots__ = ("hash", "offset")
    HASH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    hash: int
    offset: int
    def __init__(self, hash: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class StoreReserveResponse(_message.Message):
    __slots__ = ("reserved", "segment", "tag", "ttl_seconds")
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    reserved: _containers.RepeatedCompositeFieldContainer[StoreSlot]
    segment: str
    tag: str
    ttl_seconds: float
    def __init__(self, reserved: _Optional[_Iterable[_Union[StoreSlot, _Mapping]]] = ..., segment: _Optional[str] = ..., tag: _Optional[str] = ..., ttl_seconds: _Optional[float] = ...) -> None: ...

class StoreWritten(_message.Message):
    __slots__ = ("hash", "checksum", "abandoned")
    HASH_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    ABANDONED_FIELD_NUMBER: _ClassVar[int]
    hash: int
    checksum: int
    abandoned: bool
    def __init__(self, hash: _Optional[int] = ..., checksum: _Optional[int] = ..., abandoned: _Optional[bool] = ...) -> None: ...

class StoreCommitRequest(_message.Message):
    __slots__ = ("namespace", "tag", "blocks")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    tag: str
    blocks: _containers.RepeatedCompositeFieldContainer[StoreWritten]
    def __init__(self, namespace: _Optional[str] = ..., tag: _Optional[str] = ..., blocks: _Optional[_Iterable[_Union[StoreWritten, _Mapping]]] = ...) -> None: ...

class StoreCommitResponse(_message.Message):
    __slots__ = ("accepted", "rejected")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    rejected: int
    def __init__(self, accepted: _Optional[int] = ..., rejected: _Optional[int] = ...) -> None: ...

class StoreVerifyRequest(_message.Message):
    __slots__ = ("namespace", "hashes")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, namespace: _Optional[str] = ..., hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class StoreVerifyResponse(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: int
    def __init__(self, dropped: _Optional[int] = ...) -> None: ...

class StoreEventsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StoreEventBatch(_message.Message):
    __slots__ = ("snapshot", "namespace", "readable", "removed")
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    READABLE_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    snapshot: bool
    namespace: str
    readable: _containers.RepeatedScalarFieldContainer[int]
    removed: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, snapshot: _Optional[bool] = ..., namespace: _Optional[str] = ..., readable: _Optional[_Iterable[int]] = ..., removed: _Optional[_Iterable[int]] = ...) -> None: ...

class StoreStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StoreStats(_message.Message):
    __slots__ = ("store_id", "namespace", "block_bytes", "capacity_blocks", "readable_blocks", "reserved_blocks", "lookups", "hits", "committed", "rejected", "evicted", "lapsed", "integrity_error", "dropped")
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    READABLE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    LAPSED_FIELD_NUMBER: _ClassVar[int]
    INTEGRITY_ERROR_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    store_id: str
    namespace: str
    block_bytes: int
    capacity_blocks: int
    readable_blocks: int
    reserved_blocks: int
    lookups: int
    hits: int
    committed: int
    rejected: int
    evicted: int
    lapsed: int
    integrity_error: str
    dropped: int
    def __init__(self, store_id: _Optional[str] = ..., namespace: _Optional[str] = ..., block_bytes: _Optional[int] = ..., capacity_blocks: _Optional[int] = ..., readable_blocks: _Optional[int] = ..., reserved_blocks: _Optional[int] = ..., lookups: _Optional[int] = ..., hits: _Optional[int] = ..., committed: _Optional[int] = ..., rejected: _Optional[int] = ..., evicted: _Optional[int] = ..., lapsed: _Optional[int] = ..., integrity_error: _Optional[str] = ..., dropped: _Optional[int] = ...) -> None: ...
