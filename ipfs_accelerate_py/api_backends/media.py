"""Multimodal chat content parts: typed, checked before anything is sent.

A chat message's ``content`` may be a list of parts. The parts vLLM's chat API takes (its
``ChatCompletionContentPartParam``, the OpenAI shapes plus vLLM's own) are

* ``{"type": "text", "text": ...}``;
* ``{"type": "image_url", "image_url": {"url": ..., "detail"?: "auto"|"low"|"high"}}``;
* ``{"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav"|"mp3"|...}}``;
* ``{"type": "audio_url", "audio_url": {"url": ...}}`` and
  ``{"type": "video_url", "video_url": {"url": ...}}`` (vLLM's);

(vLLM's simple forms, ``{"image_url": "https://..."}`` without a type, are taken and sent
typed; a part-level ``uuid`` goes as given); a URL is ``http(s)://``, ``file://`` (a server started with ``--allowed-local-media-path``)
or a ``data:<mime>;base64,<payload>`` URL. Before sending, every known part is checked:
its fields, its URL's scheme, a data URL's media type (an image part holds ``image/*``) and
payload (it must decode), and its decoded size against the ``max_media_bytes`` setting
(``MediaTooLargeError``). A part of another type goes as given (the server judges it).

The helpers ``text_part``, ``image_part``, ``audio_part``, ``video_part`` build parts (from
a URL, or from bytes: they make the data URL). A server whose model takes no such media
refuses the request with a 400 (vLLM 0.32: "<model> is not a multimodal model"); the client
raises ``UnsupportedMediaError`` (a ``BadRequestError``) for that refusal
(``is_media_refusal``, read by the vLLM adapter's error mapping).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

__all__ = ["MAX_MEDIA_BYTES", "MEDIA_PART_TYPES", "text_part", "image_part", "audio_part",
           "video_part", "check_content_parts", "media_sizes", "is_media_refusal"]

#: Default ``max_media_bytes``: one decoded media item (OpenAI's image limit is 20 MB).
MAX_MEDIA_BYTES = 20 * 1024 * 1024
#: part type -> (the field holding it, the media type a data URL of it must have)
_URL_PARTS: Dict[str, Tuple[str, str]] = {"image_url": ("image_url", "image/"),
                                          "audio_url": ("audio_url", "audio/"),
                                          "video_url": ("video_url", "video/")}
MEDIA_PART_TYPES = frozenset({*_URL_PARTS, "input_audio"})
_AUDIO_FORMATS = frozenset({"wav", "mp3", "flac", "ogg", "m4a", "webm", "aac", "opus"})
_DETAILS = frozenset({"auto", "low", "high"})
_SCHEMES = ("http://", "https://", "file://", "data:")


#: What vLLM 0.32 says (400) when a model takes no media of a part's kind: a text-only model
#: for any media part (``multimodal/registry.py``; seen on the tiny model for image_url,
#: input_audio, audio_url and video_url alike), or a multimodal one past its per-prompt
#: limit for that modality, 0 for one it does not take (``processing/context.py``).
_REFUSALS = ("is not a multimodal model", "may be provided in one prompt")


def is_media_refusal(status: int, message: str) -> bool:
    """Whether a server's error reply is its refusal of media the model does not take."""
    return status == 400 and any(r in message for r in _REFUSALS)


def _b64_size(payload: str, where: str) -> int:
    """Decoded size of a base64 payload; ``ValueError`` naming ``where`` if it is not base64."""
    try:
        return len(base64.b64decode(payload, validate=True))
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}: the base64 payload does not decode") from None


def _data_url_size(url: str, kind: str, where: str) -> int:
    """Decoded size of a ``data:`` URL, checked: ``data:<kind>...;base64,<payload>``."""
    head, sep, payload = url.partition(",")
    if not sep:
        raise ValueError(f"{where}: a data URL needs a ',' before its payload")
    meta = head[len("data:"):].split(";")
    mime = meta[0].strip().lower()
    if not mime.startswith(kind):
        raise ValueError(f"{where}: a data URL of {mime or 'no media type'!r}; "
                         f"this part takes {kind}*")
    if "base64" not in (m.strip().lower() for m in meta[1:]):
        raise ValueError(f"{where}: only base64 data URLs are taken (';base64,')")
    if not payload:
        raise ValueError(f"{where}: the data URL is empty")
    return _b64_size(payload, where)


def _url_size(value: Any, kind: str, where: str) -> int:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: must be a non-empty URL string")
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"{where}: must not contain newlines or NUL")
    if value.startswith("data:"):
        return _data_url_size(value, kind, where)
    if not value.startswith(_SCHEMES):
        raise ValueError(f"{where}: the URL must be http(s)://, file:// or data:")
    return 0  # fetched by the server: its size is the server's to bound


def _check_part(part: Any, where: str) -> Tuple[Any, int]:
    """One part, normalised (a bare URL string becomes ``{"url": ...}``), and the decoded
    size of the media it carries inline (0 for text and URLs)."""
    if not isinstance(part, dict):
        raise ValueError(f"{where}: a content part must be an object, not {type(part).__name__}")
    kind = part.get("type")
    if kind is None:  # vLLM's simple forms: {"image_url": "https://..."} (and audio, video)
        named = [k for k in _URL_PARTS if k in part]
        if len(named) == 1:
            kind = named[0]
            part = {"type": kind, **part}
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"{where}.type: must name the part's type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise ValueError(f"{where}.text: a text part needs its text (a string)")
        return part, 0
    if kind in _URL_PARTS:
        field, mime = _URL_PARTS[kind]
        inner = part.get(field)
        if isinstance(inner, str):
            part = {**part, field: {"url": inner}}
            inner = part[field]
        if not isinstance(inner, dict):
            raise ValueError(f"{where}.{field}: must be {{'url': ...}}")
        extra = set(inner) - ({"url", "detail"} if kind == "image_url" else {"url"})
        if extra:
            raise ValueError(f"{where}.{field}: unknown field(s) {sorted(extra)} (a media "
                             "``uuid`` goes on the part itself)")
        detail = inner.get("detail")
        if detail is not None and detail not in _DETAILS:
            raise ValueError(f"{where}.{field}.detail: must be one of {sorted(_DETAILS)}")
        return part, _url_size(inner.get("url"), mime, f"{where}.{field}.url")
    if kind == "input_audio":
        inner = part.get("input_audio")
        if not isinstance(inner, dict):
            raise ValueError(f"{where}.input_audio: must be {{'data': <base64>, 'format': ...}}")
        fmt = inner.get("format")
        if fmt not in _AUDIO_FORMATS:
            raise ValueError(f"{where}.input_audio.format: must be one of {sorted(_AUDIO_FORMATS)}")
        data = inner.get("data")
        if not isinstance(data, str) or not data:
            raise ValueError(f"{where}.input_audio.data: must be base64 text")
        return part, _b64_size(data, f"{where}.input_audio.data")
    return part, 0  # a type this client does not know: the server judges it


def check_content_parts(parts: Sequence[Any], where: str = "content"
                        ) -> Tuple[List[Any], List[Tuple[str, int]]]:
    """Check a message's parts; return them (normalised) and ``(where, decoded bytes)`` of
    each inline media item. ``ValueError`` naming the part when one is malformed."""
    out, sizes = [], []
    for i, part in enumerate(parts):
        at = f"{where}[{i}]"
        part, size = _check_part(part, at)
        out.append(part)
        if size:
            sizes.append((at, size))
    return out, sizes


def media_sizes(request: Any) -> List[Tuple[str, int]]:
    """``(where, decoded bytes)`` of every inline media item of a chat request's messages
    (recorded when the messages were checked: nothing is decoded again)."""
    out: List[Tuple[str, int]] = []
    for j, message in enumerate(getattr(request, "messages", None) or ()):
        for at, size in getattr(message, "_media", ()) or ():
            out.append((f"messages[{j}].{at}", size))
    return out


# ------------------------------------------------------------------ building parts
def _data_url(data: Union[bytes, bytearray, memoryview], mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(bytes(data)).decode('ascii')}"


def text_part(text: str) -> Dict[str, Any]:
    """``{"type": "text", "text": text}``."""
    return {"type": "text", "text": text}


def image_part(image: Union[str, bytes, bytearray, memoryview], mime: str = "image/png",
               detail: Optional[str] = None) -> Dict[str, Any]:
    """An ``image_url`` part from a URL (http(s), file, data) or the image's bytes (sent as
    a ``data:`` URL of ``mime``)."""
    url = image if isinstance(image, str) else _data_url(image, mime)
    inner: Dict[str, Any] = {"url": url}
    if detail is not None:
        inner["detail"] = detail
    return {"type": "image_url", "image_url": inner}


def audio_part(audio: Union[str, bytes, bytearray, memoryview], format: str = "wav"
               ) -> Dict[str, Any]:
    """An ``input_audio`` part from the audio's bytes (base64 on the wire), or an
    ``audio_url`` part from a URL."""
    if isinstance(audio, str):
        return {"type": "audio_url", "audio_url": {"url": audio}}
    return {"type": "input_audio",
            "input_audio": {"data": base64.b64encode(bytes(audio)).decode("ascii"),
                            "format": format}}


def video_part(video: Union[str, bytes, bytearray, memoryview], mime: str = "video/mp4"
               ) -> Dict[str, Any]:
    """A ``video_url`` part from a URL or the video's bytes (a ``data:`` URL of ``mime``)."""
    url = video if isinstance(video, str) else _data_url(video, mime)
    return {"type": "video_url", "video_url": {"url": url}}
