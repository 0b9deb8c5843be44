"""The wire contract: pydantic models and the msgpack codec. Imports neither Ray nor aio-pika."""

from schemas.codec import CodecLimits, DecodeError, TooLarge, decode, encode
from schemas.control import CancelRequest, ControlRequest, StatusRequest, parse_control
from schemas.reply import ErrorCode, ErrorInfo, Reply, Status, Timing
from schemas.task import PoolName, Resources, TaskMessage, TaskType

__all__ = [
    "CancelRequest",
    "CodecLimits",
    "ControlRequest",
    "DecodeError",
    "ErrorCode",
    "ErrorInfo",
    "PoolName",
    "Reply",
    "Resources",
    "Status",
    "StatusRequest",
    "TaskMessage",
    "TaskType",
    "Timing",
    "TooLarge",
    "decode",
    "encode",
    "parse_control",
]
