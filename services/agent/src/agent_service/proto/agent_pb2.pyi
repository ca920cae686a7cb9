from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DisconnectPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CANCEL: _ClassVar[DisconnectPolicy]
    CONTINUE: _ClassVar[DisconnectPolicy]

class BusyPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REJECT: _ClassVar[BusyPolicy]
    ENQUEUE: _ClassVar[BusyPolicy]
    INTERRUPT: _ClassVar[BusyPolicy]
CANCEL: DisconnectPolicy
CONTINUE: DisconnectPolicy
REJECT: BusyPolicy
ENQUEUE: BusyPolicy
INTERRUPT: BusyPolicy

class ResumeRequest(_message.Message):
    __slots__ = ("run_id", "after_sequence")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    after_sequence: int
    def __init__(self, run_id: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class ChatRequest(_message.Message):
    __slots__ = ("content", "metadata", "session_id", "on_disconnect", "if_busy")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ON_DISCONNECT_FIELD_NUMBER: _ClassVar[int]
    IF_BUSY_FIELD_NUMBER: _ClassVar[int]
    content: str
    metadata: _containers.ScalarMap[str, str]
    session_id: str
    on_disconnect: DisconnectPolicy
    if_busy: BusyPolicy
    def __init__(self, content: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., session_id: _Optional[str] = ..., on_disconnect: _Optional[_Union[DisconnectPolicy, str]] = ..., if_busy: _Optional[_Union[BusyPolicy, str]] = ...) -> None: ...

class ChatResponse(_message.Message):
    __slots__ = ("content", "tool_use", "tool_result", "error", "done", "heartbeat", "event_id", "sequence", "session_id", "turn", "run_id")
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    TOOL_USE_FIELD_NUMBER: _ClassVar[int]
    TOOL_RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    content: ContentChunk
    tool_use: ToolUse
    tool_result: ToolResult
    error: Error
    done: Done
    heartbeat: Heartbeat
    event_id: str
    sequence: int
    session_id: str
    turn: int
    run_id: str
    def __init__(self, content: _Optional[_Union[ContentChunk, _Mapping]] = ..., tool_use: _Optional[_Union[ToolUse, _Mapping]] = ..., tool_result: _Optional[_Union[ToolResult, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., done: _Optional[_Union[Done, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., event_id: _Optional[str] = ..., sequence: _Optional[int] = ..., session_id: _Optional[str] = ..., turn: _Optional[int] = ..., run_id: _Optional[str] = ...) -> None: ...

class ContentChunk(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class ToolUse(_message.Message):
    __slots__ = ("tool_name", "tool_id", "input")
    TOOL_NAME_FIELD_NUMBER: _ClassVar[int]
    TOOL_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    tool_name: str
    tool_id: str
    input: str
    def __init__(self, tool_name: _Optional[str] = ..., tool_id: _Optional[str] = ..., input: _Optional[str] = ...) -> None: ...

class ToolResult(_message.Message):
    __slots__ = ("tool_id", "output", "status", "tool_name")
    TOOL_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TOOL_NAME_FIELD_NUMBER: _ClassVar[int]
    tool_id: str
    output: str
    status: str
    tool_name: str
    def __init__(self, tool_id: _Optional[str] = ..., output: _Optional[str] = ..., status: _Optional[str] = ..., tool_name: _Optional[str] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class Done(_message.Message):
    __slots__ = ("stop_reason", "usage", "event_count", "duration_ms")
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    EVENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    stop_reason: str
    usage: Usage
    event_count: int
    duration_ms: float
    def __init__(self, stop_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., event_count: _Optional[int] = ..., duration_ms: _Optional[float] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sequence",)
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    def __init__(self, sequence: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("input_tokens", "output_tokens", "total_tokens")
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    input_tokens: int
    output_tokens: int
    total_tokens: int
    def __init__(self, input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ...) -> None: ...
