from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRequest(_message.Message):
    __slots__ = ("features", "model_version", "max_tokens")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedScalarFieldContainer[float]
    model_version: str
    max_tokens: int
    def __init__(self, features: _Optional[_Iterable[float]] = ..., model_version: _Optional[str] = ..., max_tokens: _Optional[int] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predictions", "latency_ms", "served_by", "model_version")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedScalarFieldContainer[float]
    latency_ms: float
    served_by: str
    model_version: str
    def __init__(self, predictions: _Optional[_Iterable[float]] = ..., latency_ms: _Optional[float] = ..., served_by: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class TokenResponse(_message.Message):
    __slots__ = ("token", "is_finished", "served_by")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    IS_FINISHED_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    token: str
    is_finished: bool
    served_by: str
    def __init__(self, token: _Optional[str] = ..., is_finished: _Optional[bool] = ..., served_by: _Optional[str] = ...) -> None: ...

class FeatureUpdate(_message.Message):
    __slots__ = ("entity_id", "features", "sequence")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ENTITY_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    entity_id: str
    features: _containers.ScalarMap[str, float]
    sequence: int
    def __init__(self, entity_id: _Optional[str] = ..., features: _Optional[_Mapping[str, float]] = ..., sequence: _Optional[int] = ...) -> None: ...

class AckResponse(_message.Message):
    __slots__ = ("entity_id", "sequence", "accepted", "served_by")
    ENTITY_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    entity_id: str
    sequence: int
    accepted: bool
    served_by: str
    def __init__(self, entity_id: _Optional[str] = ..., sequence: _Optional[int] = ..., accepted: _Optional[bool] = ..., served_by: _Optional[str] = ...) -> None: ...

class UploadSummary(_message.Message):
    __slots__ = ("count", "last_sequence", "served_by")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    count: int
    last_sequence: int
    served_by: str
    def __init__(self, count: _Optional[int] = ..., last_sequence: _Optional[int] = ..., served_by: _Optional[str] = ...) -> None: ...
