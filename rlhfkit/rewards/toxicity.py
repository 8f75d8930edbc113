"""Toxicity by offline scorers: alt-profanity-check and HateSonar (ONNX), :func:`toxicity_prob`
and the :class:`Toxicity` reward.
"""
from __future__ import annotations

import functools
from typing import Sequence

from rlhfkit.config import ConfigError



def toxicity_prob(texts: Sequence[str], backend: str = "profanity_check") -> list[float]:
    """p(toxic) of each text.

    ``profanity_check``: alt-profanity-check's calibrated linear SVM on TF-IDF features.
    ``hatesonar``: HateSonar's TF-IDF + logistic regression (three classes), p(toxic) =
    p(hate_speech) + p(offensive_language). Both are trained on tweets / Wikipedia comments.
    """
    texts = list(texts)
    if not texts:
        return []
    if backend == "profanity_check":
        from profanity_check import predict_prob

        return [float(p) for p in predict_prob(texts)]
    if backend == "hatesonar":
        import numpy as np

        session = _hatesonar_session()
        _, probs = session.run(None, {"text": np.array(texts, dtype=object)})  # ZipMap: [{class: p}]
        return [float(p[0] + p[1]) for p in probs]
    raise ConfigError(f"toxicity backend must be 'profanity_check' or 'hatesonar', got '{backend}'")


@functools.lru_cache(maxsize=1)
def _hatesonar_session():
    """onnxruntime session of HateSonar's model.

    Its ``StringNormalizer`` node carries no ``locale`` attribute, so onnxruntime uses
    ``en_US.UTF-8``, which many machines (containers) lack: session creation then fails. In that
    case the model is loaded again with ``locale = "C.UTF-8"`` written into those nodes. The
    ``onnx`` package is not a dependency, so the edit is done on the protobuf wire format.
    """
    import onnxruntime as ort

    from rlhfkit.assets import package_dir

    model_file = package_dir("hatesonar") / "model" / "model.onnx"
    data = model_file.read_bytes()
    quiet = ort.SessionOptions()
    quiet.log_severity_level = 4  # the expected locale failure would otherwise be logged as an error
    try:
        return ort.InferenceSession(data, quiet, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail type
        if "locale" not in str(e):
            raise
    return ort.InferenceSession(_onnx_set_locale(data, "C.UTF-8"), providers=["CPUExecutionProvider"])


def _onnx_set_locale(model: bytes, locale: str) -> bytes:
    """Add ``locale`` to every top-level StringNormalizer node of a serialised ONNX ModelProto.

    Field numbers (onnx.proto): ModelProto.graph = 7; GraphProto.node = 1; NodeProto.op_type = 4,
    NodeProto.attribute = 5; AttributeProto.name = 1, .s = 4, .type = 20 (STRING = 3).
    """
    attr = _pb_bytes(1, b"locale") + _pb_bytes(4, locale.encode()) + _pb_varint_field(20, 3)

    def patch_graph(graph: bytes) -> bytes:
        out = bytearray()
        for num, raw, payload in _pb_fields(graph):
            if num == 1 and any(n == 4 and p == b"StringNormalizer" for n, _, p in _pb_fields(payload)):
                raw = _pb_bytes(1, payload + _pb_bytes(5, attr))
            out += raw
        return bytes(out)

    return b"".join(_pb_bytes(7, patch_graph(p)) if n == 7 else raw for n, raw, p in _pb_fields(model))


def _pb_read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _pb_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b, value = value & 0x7F, value >> 7
        out.append(b | 0x80 if value else b)
        if not value:
            return bytes(out)


def _pb_fields(buf: bytes):
    """(field number, raw bytes of the field, payload of a length-delimited field or None)."""
    i = 0
    while i < len(buf):
        key, j = _pb_read_varint(buf, i)
        num, wire = key >> 3, key & 7
        payload = None
        if wire == 0:
            _, k = _pb_read_varint(buf, j)
        elif wire == 1:
            k = j + 8
        elif wire == 5:
            k = j + 4
        elif wire == 2:
            length, j = _pb_read_varint(buf, j)
            k = j + length
            payload = buf[j:k]
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield num, buf[i:k], payload
        i = k


def _pb_bytes(num: int, payload: bytes) -> bytes:
    return _pb_varint(num << 3 | 2) + _pb_varint(len(payload)) + payload


def _pb_varint_field(num: int, value: int) -> bytes:
    return _pb_varint(num << 3) + _pb_varint(value)


class Toxicity:
    """Toxicity of the completion by an offline scorer (see :func:`toxicity_prob`).

    ``invert=True`` (the default) returns ``1 - p(toxic)``, a non-toxicity reward for detoxification;
    ``invert=False`` returns ``p(toxic)`` (an evaluation metric).
    """

    def __init__(self, backend: str = "profanity_check", invert: bool = True):
        if backend not in ("profanity_check", "hatesonar"):
            raise ConfigError(f"toxicity backend must be 'profanity_check' or 'hatesonar', got '{backend}'")
        self.backend, self.invert = backend, invert
        self.name = f"toxicity:{backend}"

    def __call__(self, prompts, completions, **columns) -> list[float]:
        p = toxicity_prob(completions, self.backend)
        return [1.0 - x for x in p] if self.invert else p
