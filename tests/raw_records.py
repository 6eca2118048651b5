"""Producing records that confluent-kafka's Producer cannot write: header names that are not
valid UTF-8 or hold a NUL byte (its `produce` takes names as `str`). Calls the librdkafka that
ships with confluent-kafka through ctypes: `rd_kafka_header_add` takes a name as bytes with a
length. Not a test module (no `test_` prefix)."""

from __future__ import annotations

import ctypes
import glob
import os
from collections.abc import Iterable, Sequence

import confluent_kafka

_VTYPE_TOPIC, _VTYPE_VALUE, _VTYPE_KEY, _VTYPE_HEADERS = 1, 4, 5, 10


class _Mem(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_size_t)]


class _U(ctypes.Union):
    _fields_ = [("cstr", ctypes.c_char_p), ("mem", _Mem), ("ptr", ctypes.c_void_p),
                ("_pad", ctypes.c_char * 64)]  # fmt: skip


class _VU(ctypes.Structure):  # rd_kafka_vu_t
    _fields_ = [("vtype", ctypes.c_int), ("u", _U)]


def _lib() -> ctypes.CDLL:
    package = os.path.dirname(confluent_kafka.__file__)
    (path,) = glob.glob(os.path.join(package, os.pardir, "confluent_kafka.libs", "librdkafka*.so*"))
    lib = ctypes.CDLL(path)
    lib.rd_kafka_conf_new.restype = ctypes.c_void_p
    lib.rd_kafka_conf_set.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p,
                                      ctypes.c_char_p, ctypes.c_size_t]  # fmt: skip
    lib.rd_kafka_new.restype = ctypes.c_void_p
    lib.rd_kafka_new.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.rd_kafka_headers_new.restype = ctypes.c_void_p
    lib.rd_kafka_headers_new.argtypes = [ctypes.c_size_t]
    lib.rd_kafka_header_add.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ssize_t,
                                        ctypes.c_char_p, ctypes.c_ssize_t]  # fmt: skip
    lib.rd_kafka_headers_destroy.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_produceva.restype = ctypes.c_void_p
    lib.rd_kafka_produceva.argtypes = [ctypes.c_void_p, ctypes.POINTER(_VU), ctypes.c_size_t]
    lib.rd_kafka_error_string.restype = ctypes.c_char_p
    lib.rd_kafka_error_string.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_flush.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.rd_kafka_outq_len.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_destroy.argtypes = [ctypes.c_void_p]
    return lib


RawHeaders = Sequence[tuple[bytes, bytes | None]]


def produce_raw(
    bootstrap: str,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes | None, RawHeaders]],
    *,
    message_max_bytes: int = 100_000_000,
) -> None:
    """Produce (key, value, headers) records; header names are raw bytes, any bytes."""
    lib = _lib()
    errstr = ctypes.create_string_buffer(512)
    conf = lib.rd_kafka_conf_new()
    for name, value in (
        ("bootstrap.servers", bootstrap),
        ("message.max.bytes", str(message_max_bytes)),
        ("linger.ms", "20"),
    ):
        if lib.rd_kafka_conf_set(conf, name.encode(), value.encode(), errstr, 512) != 0:
            raise ValueError(errstr.value.decode())
    rk = lib.rd_kafka_new(0, conf, errstr, 512)  # RD_KAFKA_PRODUCER
    if not rk:
        raise RuntimeError(errstr.value.decode())
    keep: list[object] = []  # keys and values are not copied: alive until flushed
    try:
        for key, value, headers in records:
            hdrs = lib.rd_kafka_headers_new(max(1, len(headers)))
            for name, hvalue in headers:
                lib.rd_kafka_header_add(
                    hdrs, name, len(name), hvalue, -1 if hvalue is None else len(hvalue)
                )
            vus = [_VU(_VTYPE_TOPIC, _U(cstr=topic.encode()))]
            for vtype, data in ((_VTYPE_KEY, key), (_VTYPE_VALUE, value)):
                if data is not None:
                    buf = ctypes.create_string_buffer(data, len(data))
                    keep.append(buf)
                    mem = _Mem(ctypes.cast(buf, ctypes.c_void_p), len(data))
                    vus.append(_VU(vtype, _U(mem=mem)))
            vus.append(_VU(_VTYPE_HEADERS, _U(ptr=hdrs)))
            array = (_VU * len(vus))(*vus)
            error = lib.rd_kafka_produceva(rk, array, len(vus))
            if error:
                lib.rd_kafka_headers_destroy(hdrs)  # not taken over on failure
                raise RuntimeError(lib.rd_kafka_error_string(error).decode())
        lib.rd_kafka_flush(rk, 30_000)
        if lib.rd_kafka_outq_len(rk) != 0:
            raise RuntimeError("raw records not delivered within 30 s")
    finally:
        lib.rd_kafka_destroy(rk)
