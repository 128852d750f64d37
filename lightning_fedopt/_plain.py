"""Plain values as bytes, for the control messages ranks exchange: JSON, never pickle.

What a peer sends is decoded with :func:`json.loads` and rebuilt from a closed set of types, so a
crafted message can at worst be refused; it cannot run code (a pickle can). The types are the
ones control traffic uses: ``None``, ``bool``, ``int``, ``float`` (NaN and infinities too),
``str``, ``list``, ``tuple``, ``dict`` (keys of these types), :class:`pathlib.Path` and small
:class:`torch.Tensor` values (dtype, shape and elements; sent as Python numbers).

Every container travels tagged (``{"t": [...]}`` a tuple, ``{"d": [[k, v], ...]}`` a dict,
``{"p": "..."}`` a path, ``{"T": [dtype, shape, values]}`` a tensor), so a decoded value has the
type that was encoded.

Example:
    >>> decode_plain(encode_plain({"path": "/ckpt/a.ckpt", "step": 3, "shape": (2, 3)}))
    {'path': '/ckpt/a.ckpt', 'step': 3, 'shape': (2, 3)}
"""

from __future__ import annotations

import json
import math
from pathlib import Path, PurePath
from typing import Any

import torch

from lightning_fedopt.errors import PlainValueError

__all__ = ["PlainValueError", "decode_plain", "encode_plain"]

#: tensors above this many elements are refused (control messages are small)
MAX_TENSOR_NUMEL = 1 << 16
_DEPTH = 64


def _enc(obj: Any, depth: int) -> Any:
    if depth > _DEPTH:
        raise PlainValueError("value nested too deeply for a control message")
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"f": repr(obj)}
    if isinstance(obj, list):
        return [_enc(v, depth + 1) for v in obj]
    if isinstance(obj, tuple) and type(obj) is tuple:
        return {"t": [_enc(v, depth + 1) for v in obj]}
    if isinstance(obj, dict):
        return {"d": [[_enc(k, depth + 1), _enc(v, depth + 1)] for k, v in obj.items()]}
    if isinstance(obj, PurePath):
        return {"p": str(obj)}
    if isinstance(obj, torch.Tensor):
        if obj.numel() > MAX_TENSOR_NUMEL:
            raise PlainValueError(f"a tensor of {obj.numel()} elements is too large for a control message")
        values = obj.detach().cpu().reshape(-1)
        if values.is_complex():
            raise PlainValueError("a complex tensor cannot travel as a control message")
        if values.is_floating_point():
            values = values.double()  # exact for every floating dtype
        return {
            "T": [
                str(obj.dtype).removeprefix("torch."),
                list(obj.shape),
                [_enc(v, depth + 1) for v in values.tolist()],
            ]
        }
    raise PlainValueError(
        f"a {type(obj).__module__}.{type(obj).__qualname__} cannot travel between ranks: control messages "
        "carry only None, bool, int, float, str, list, tuple, dict, pathlib.Path and small tensors "
        "(no pickle: what a peer sends must not be able to run code)"
    )


def encode_plain(obj: Any) -> bytes:
    """``obj`` as UTF-8 JSON bytes; :class:`PlainValueError` for a type outside the plain set."""
    return json.dumps(_enc(obj, 0), separators=(",", ":"), allow_nan=False).encode()


def _dec(x: Any, depth: int) -> Any:
    if depth > _DEPTH:
        raise PlainValueError("control message nested too deeply")
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, list):
        return [_dec(v, depth + 1) for v in x]
    if not isinstance(x, dict) or len(x) != 1:
        raise PlainValueError("malformed control message")
    ((tag, body),) = x.items()
    if tag == "f" and body in ("nan", "inf", "-inf"):
        return float(body)
    if tag == "t" and isinstance(body, list):
        return tuple(_dec(v, depth + 1) for v in body)
    if tag == "d" and isinstance(body, list):
        out = {}
        for pair in body:
            if not isinstance(pair, list) or len(pair) != 2:
                raise PlainValueError("malformed dict in a control message")
            key = _dec(pair[0], depth + 1)
            if isinstance(key, (list, dict)):
                raise PlainValueError("unhashable dict key in a control message")
            out[key] = _dec(pair[1], depth + 1)
        return out
    if tag == "p" and isinstance(body, str):
        return Path(body)
    if tag == "T" and isinstance(body, list) and len(body) == 3:
        name, shape, values = body
        dtype = getattr(torch, name, None) if isinstance(name, str) else None
        if not isinstance(dtype, torch.dtype) or not isinstance(shape, list):
            raise PlainValueError("malformed tensor in a control message")
        if not all(isinstance(s, int) and s >= 0 for s in shape) or not isinstance(values, list):
            raise PlainValueError("malformed tensor in a control message")
        if len(values) > MAX_TENSOR_NUMEL or math.prod(shape) != len(values):
            raise PlainValueError("malformed tensor in a control message")
        flat = [_dec(v, depth + 1) for v in values]
        if not all(isinstance(v, (bool, int, float)) for v in flat):
            raise PlainValueError("malformed tensor in a control message")
        return torch.tensor(flat, dtype=dtype).reshape(shape)
    raise PlainValueError("malformed control message")


def decode_plain(data: bytes) -> Any:
    """The value :func:`encode_plain` encoded; :class:`PlainValueError` for anything else (which
    includes a pickle: it is not JSON)."""
    try:
        tree = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise PlainValueError(
            f"a control message is not plain JSON ({err.__class__.__name__}); refused"
        ) from None
    return _dec(tree, 0)
