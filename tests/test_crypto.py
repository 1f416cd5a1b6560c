"""Known-answer, tamper, interop and property tests for wxd.wechat.crypto.

The vectors are WeChat's own examples, wechatpy's tests and self-generated ones (each cited below).
"""

from __future__ import annotations

import base64
import json

import pytest
import xmltodict
from Crypto.Cipher import AES
from hypothesis import given, settings
from hypothesis import strategies as st
from wechatpy.crypto import WeChatCrypto

from wxd.errors import DecryptError, MiniProgramError, SessionKeyError, WatermarkError
from wxd.wechat.crypto import (
    MessageCrypto,
    check_signature,
    decode_aes_key,
    decrypt_mp_data,
    raw_data_signature,
    session_signature,
    sign,
)

# WeCom vector from wechatpy's tests (corp id in place of the appid):
# https://github.com/wechatpy/wechatpy/blob/master/tests/test_crypto.py
V3_TOKEN = "123456"
V3_KEY = "kWxPEV2UEDyxWpmPdKC3F4dgPDmOvfKX1HGnEUDS1aR"
V3_ID = "wx49f0ab532d5d035a"
V3_TIMESTAMP = "1411525903"
V3_NONCE = "461056294"
V3_ENCRYPT = (
    "RgqEoJj5A4EMYlLvWO1F86ioRjZfaex/gePD0gOXTxpsq5Yj4GNglrBb8I2BAJVODGajiFnXBu7mCPatfjsu6IHCrsTy"
    "eDXzF6Bv283dGymzxh6ydJRvZsryDyZbLTE7rhnus50qGPMfp2wASFlzEgMW9z1ef/RD8XzaFYgm7iTdaXpXaG4+BiYy"
    "olBug/gYNx410cvkKR2/nPwBiT+P4hIiOAQqGp/TywZBtDh1yCF2KOd0gpiMZ5jSw3e29mTvmUHzkVQiMS6td7vXUaWO"
    "MZnYZlF3So2SjHnwh4jYFxdgpkHHqIrH/54SNdshoQgWYEvccTKe7FS709/5t6NMxuGhcUGAPOQipvWTT4dShyqio7ml"
    "sl5noTrb++x6En749zCpQVhDpbV6GDnTbcX2e8K9QaNWHp91eBdCRxthuL0="
)
V3_MSG_SIGNATURE = "74d92dfeb87ba7c714f89d98870ae5eb62dff26d"
V3_XML = (
    "<xml><ToUserName><![CDATA[wx49f0ab532d5d035a]]></ToUserName>\n"
    "<FromUserName><![CDATA[messense]]></FromUserName>\n"
    "<CreateTime>1411525903</CreateTime>\n"
    "<MsgType><![CDATA[text]]></MsgType>\n"
    "<Content><![CDATA[test]]></Content>\n"
    "<MsgId>4363689963896700987</MsgId>\n"
    "<AgentID>1</AgentID>\n"
    "</xml>"
)

# Self-generated OA vector with the fixed random prefix, made with the scheme of
# https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Message_encryption_and_decryption_instructions.html
V4_TOKEN = "testtoken"
V4_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
V4_APPID = "wx1234567890abcdef"
V4_TIMESTAMP = "1700000000"
V4_NONCE = "123456789"
V4_PREFIX = b"0123456789abcdef"
V4_XML = (
    "<xml><ToUserName><![CDATA[gh_0123456789ab]]></ToUserName>"
    "<FromUserName><![CDATA[oABCD1234]]></FromUserName><CreateTime>1700000000</CreateTime>"
    "<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[subscribe]]></Event>"
    "<EventKey><![CDATA[]]></EventKey></xml>"
)
V4_ENCRYPT = (
    "Q3stYC6hdFzMh9T8HCvyDPYd4batj7zR9qX1tTJwVo3rIGsIyiksc+v3Gxca8gMqrf6CKjLspeib04rpk/Tk+n5SKeiu"
    "Ogf9/3MzfMLXNvb8/4JtPLwVYsqmSXitdQrWQ1uLKFf1WaBaN2PFGwwoCiBJpEZsXmHFBIgCgB714pDpL48wrITJ/53j"
    "YuqSp8FAjd552PsFbBnmSP6xqKavwqsero0S+gHFsiKy2u50plWiC8Tumw2M/bASsVGhl82cydQjBsLgKKE79FUeASbK"
    "PXIGvgiq4U90rWLEWBlxuRej07+dFJPmb1SNHe2/L3xdegx6+o8sIVuUu24SanEMCeUcDvZEqo/y3+aW+GeNtmq/cKjx"
    "HmT2d6fnf8RFpJMBEoaEF8dBjOTuhUiCw2LjsWMHaJBifWnTHbvS75RU7Bs="
)
V4_MSG_SIGNATURE = "196e68f4db1d73e10fe5a519d4fb557efec40e83"

# Official MP encryptedData sample:
# https://developers.weixin.qq.com/miniprogram/dev/framework/open-ability/signature.html
V5_APPID = "wx4f4bc4dec97d474b"
V5_SESSION_KEY = "tiihtNczf5v6AKRyjwEUhQ=="
V5_IV = "r7BXXKkLb8qrSNn05n0qiA=="
V5_DATA = (
    "CiyLU1Aw2KjvrjMdj8YKliAjtP4gsMZMQmRzooG2xrDcvSnxIMXFufNstNGTyaGS9uT5geRa0W4oTOb1WT7fJlAC+oNP"
    "dbB+3hVbJSRgv+4lGOETKUQz6OYStslQ142dNCuabNPGBzlooOmB231qMM85d2/fV6ChevvXvQP8Hkue1poOFtnEtpyx"
    "VLW1zAo6/1Xx1COxFvrc2d7UL/lmHInNlxuacJXwu0fjpXfz/YqYzBIBzD6WUfTIF9GRHpOn/Hz7saL8xz+W//FRAUid"
    "1OksQaQx4CMs8LOddcQhULW4ucetDf96JcR3g0gfRK4PC7E/r7Z6xNrXd2UIeorGj5Ef7b1pJAYB6Y5anaHqZ9J6nKEB"
    "vB4DnNLIVWSgARns/8wR2SiRS7MNACwTyrGvt9ts8p12PKFdlqYTopNHR1Vf7XjfhQlVsAJdNiKdYmYVoKlaRv85IfVu"
    "nYzO0IKXsyl7JCUjCpoG20f0a04COwfneQAGGwd5oa+T8yO5hzuyDb/XcxxmK01EpqOyuxINew=="
)

OTHER_KEY = "ZYXWVUTSRQPONMLKJIHGFEDCBA9876543210zyxwvut"


def v4_crypto(**kwargs: str) -> MessageCrypto:
    return MessageCrypto(V4_TOKEN, V4_KEY, V4_APPID, **kwargs)


def oa_raw_encrypt(encoding_aes_key: str, plain: bytes) -> str:
    """Encrypt already-padded plaintext bytes, to craft payloads MessageCrypto would never make."""
    key = decode_aes_key(encoding_aes_key)
    return base64.b64encode(AES.new(key, AES.MODE_CBC, iv=key[:16]).encrypt(plain)).decode()


def oa_raw_decrypt(encoding_aes_key: str, encrypt: str) -> bytes:
    key = decode_aes_key(encoding_aes_key)
    return AES.new(key, AES.MODE_CBC, iv=key[:16]).decrypt(base64.b64decode(encrypt))


def oa_body(xml: bytes, appid: bytes = V4_APPID.encode(), length: int | None = None) -> bytes:
    n = len(xml) if length is None else length
    return V4_PREFIX + n.to_bytes(4, "big") + xml + appid


def pad32(data: bytes) -> bytes:
    p = 32 - len(data) % 32
    return data + bytes([p]) * p


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def mp_raw_encrypt(plain: bytes) -> tuple[str, str, str]:
    """(session_key, encryptedData, iv) for already-padded plaintext."""
    key, iv = b"k" * 16, b"i" * 16
    return b64(key), b64(AES.new(key, AES.MODE_CBC, iv=iv).encrypt(plain)), b64(iv)


def pad16(data: bytes) -> bytes:
    p = 16 - len(data) % 16
    return data + bytes([p]) * p


# --- signatures ---------------------------------------------------------------------------------
# The official examples:
# https://developers.weixin.qq.com/miniprogram/dev/framework/server-ability/message-push.html


def test_vector1_url_verification_signature() -> None:
    assert sign("AAAAA", "1714036504", "1514711492") == "f464b24fc39322e44b38aa78f5edd27bd1441696"
    assert check_signature("f464b24fc39322e44b38aa78f5edd27bd1441696", "AAAAA", "1714036504", "1514711492")


def test_vector2_post_signature() -> None:
    assert sign("AAAAA", "1714037059", "486452656") == "899cf89e464efb63f54ddac96b0a0a235f53aa78"


def test_sign_sorts_parts() -> None:
    assert sign("1514711492", "AAAAA", "1714036504") == sign("AAAAA", "1714036504", "1514711492")
    # Sorting is by string, not by number: "9" sorts after "10".
    assert sign("9", "10") == sign("10", "9") != sign("910")
    assert sign("10", "9") == sign("109")


def test_check_signature_rejects() -> None:
    parts = ("AAAAA", "1714036504", "1514711492")
    good = "f464b24fc39322e44b38aa78f5edd27bd1441696"
    assert not check_signature(good[:-1] + "7", *parts)
    assert not check_signature(good.upper(), *parts)
    assert not check_signature("", *parts)
    assert not check_signature("f464b24fc39322e44b38aa78f5edd27bd144169é", *parts)
    assert not check_signature(good, "AAAAA", "1714036504", "1514711493")


# --- decode_aes_key ---------------------------------------------------------------------------


def test_decode_aes_key_valid() -> None:
    key = decode_aes_key(V4_KEY)
    assert len(key) == 32
    assert key == base64.b64decode(V4_KEY + "=")


@pytest.mark.parametrize(
    "bad",
    [
        V4_KEY[:42],
        V4_KEY + "H",
        "",
        V4_KEY[:42] + "+",
        V4_KEY[:42] + "/",
        V4_KEY[:42] + "=",
        V4_KEY[:42] + "-",
        V4_KEY[:42] + "é",
        V4_KEY[:42] + " ",
    ],
)
def test_decode_aes_key_rejects(bad: str) -> None:
    with pytest.raises(ValueError) as info:
        decode_aes_key(bad)
    assert V4_KEY[:20] not in str(info.value)


def test_message_crypto_rejects_bad_keys() -> None:
    with pytest.raises(ValueError):
        MessageCrypto(V4_TOKEN, V4_KEY[:42], V4_APPID)
    with pytest.raises(ValueError):
        MessageCrypto(V4_TOKEN, V4_KEY, V4_APPID, previous_encoding_aes_key=V4_KEY + "A")


# --- WeCom vector --------------------------------------------------------------------------------


def test_vector3_decrypt() -> None:
    crypto = MessageCrypto(V3_TOKEN, V3_KEY, V3_ID)
    assert crypto.check_msg_signature(V3_MSG_SIGNATURE, V3_TIMESTAMP, V3_NONCE, V3_ENCRYPT)
    assert crypto.decrypt(V3_ENCRYPT) == V3_XML
    assert "<FromUserName><![CDATA[messense]]></FromUserName>" in V3_XML
    assert oa_raw_decrypt(V3_KEY, V3_ENCRYPT)[-1] == 1  # the pad byte the sheet states


def test_vector3_msg_signature_is_not_url_signature() -> None:
    crypto = MessageCrypto(V3_TOKEN, V3_KEY, V3_ID)
    url_signature = sign(V3_TOKEN, V3_TIMESTAMP, V3_NONCE)
    assert not crypto.check_msg_signature(url_signature, V3_TIMESTAMP, V3_NONCE, V3_ENCRYPT)
    assert not crypto.check_msg_signature(V3_MSG_SIGNATURE, V3_TIMESTAMP, "461056295", V3_ENCRYPT)


# --- self-generated OA vector --------------------------------------------------------------------


def test_vector4_encrypt_reproduces_known_answer() -> None:
    encrypt = v4_crypto().encrypt(V4_XML, random_prefix=V4_PREFIX)
    assert encrypt == V4_ENCRYPT
    assert sign(V4_TOKEN, V4_TIMESTAMP, V4_NONCE, encrypt) == V4_MSG_SIGNATURE
    assert oa_raw_decrypt(V4_KEY, encrypt)[-1] == 29


def test_vector4_decrypt_and_msg_signature() -> None:
    crypto = v4_crypto()
    assert crypto.check_msg_signature(V4_MSG_SIGNATURE, V4_TIMESTAMP, V4_NONCE, V4_ENCRYPT)
    assert crypto.decrypt(V4_ENCRYPT) == V4_XML


def test_encrypt_uses_fresh_random_prefix() -> None:
    crypto = v4_crypto()
    first, second = crypto.encrypt(V4_XML), crypto.encrypt(V4_XML)
    assert first != second
    assert crypto.decrypt(first) == crypto.decrypt(second) == V4_XML
    with pytest.raises(ValueError):
        crypto.encrypt(V4_XML, random_prefix=b"short")


def test_padding_is_to_32_bytes() -> None:
    crypto = v4_crypto()
    # body = 16 + 4 + len(xml) + 18 (appid): with xml of 26 bytes the body is 64 -> a full 32 pad.
    raw = oa_raw_decrypt(V4_KEY, crypto.encrypt("x" * 26, random_prefix=V4_PREFIX))
    assert len(raw) == 96
    assert raw[-32:] == bytes([32]) * 32
    raw = oa_raw_decrypt(V4_KEY, crypto.encrypt("x" * 27, random_prefix=V4_PREFIX))
    assert len(raw) == 96 and raw[-31:] == bytes([31]) * 31


# --- tampering: every failure is a DecryptError with a reason -----------------------------------


def decrypt_reason(encrypt: str, crypto: MessageCrypto | None = None) -> str:
    with pytest.raises(DecryptError) as info:
        (crypto or v4_crypto()).decrypt(encrypt)
    return str(info.value)


@pytest.mark.parametrize("encrypt", ["!!!!", "abc", "QUJD\n", "QUJDRA==é", "QU JD", "Q3s"])
def test_bad_base64(encrypt: str) -> None:
    assert decrypt_reason(encrypt) == "bad base64"


@pytest.mark.parametrize(
    "encrypt",
    ["", base64.b64encode(b"x" * 15).decode(), base64.b64encode(b"x" * 33).decode()],
)
def test_bad_ciphertext_length(encrypt: str) -> None:
    assert decrypt_reason(encrypt) == "bad length"


def test_tampered_ciphertext_rejected() -> None:
    raw = bytearray(base64.b64decode(V4_ENCRYPT))
    for index in (0, 40, len(raw) - 1, len(raw) - 20):
        tampered = bytearray(raw)
        tampered[index] ^= 0x01
        with pytest.raises(DecryptError):
            v4_crypto().decrypt(base64.b64encode(bytes(tampered)).decode())
    # A truncated message loses the block holding the pad and appid.
    with pytest.raises(DecryptError):
        v4_crypto().decrypt(base64.b64encode(bytes(raw[:-32])).decode())


@pytest.mark.parametrize("pad", [0, 33, 255])
def test_pad_value_out_of_range(pad: int) -> None:
    body = oa_body(b"<xml/>")
    plain = body + bytes(64 - len(body) - 1) + bytes([pad])
    assert len(plain) % 32 == 0
    assert decrypt_reason(oa_raw_encrypt(V4_KEY, plain)) == "bad padding"


def test_pad_of_33_rejected_even_when_consistent() -> None:
    body = oa_body(b"<xml>" + b"a" * 20 + b"</xml>")
    assert len(body) == 69
    plain = body + bytes([33]) * 59  # the last 33 bytes are all 33
    assert decrypt_reason(oa_raw_encrypt(V4_KEY, plain)) == "bad padding"


def test_pad_bytes_must_all_be_equal() -> None:
    body = oa_body(b"<xml/>")
    good = pad32(body)
    pad = good[-1]
    assert pad >= 3
    bad = good[:-3] + bytes([pad - 1]) + good[-2:]
    assert decrypt_reason(oa_raw_encrypt(V4_KEY, bad)) == "bad padding"
    assert v4_crypto().decrypt(oa_raw_encrypt(V4_KEY, good)) == "<xml/>"


def test_pad_of_16_to_32_accepted() -> None:
    # A 16-byte PKCS#7 unpadder would reject this; the OA scheme uses 32.
    body = oa_body(b"<xml>" + b"a" * 18 + b"</xml>")
    assert len(body) == 67 and pad32(body)[-1] == 29
    assert v4_crypto().decrypt(oa_raw_encrypt(V4_KEY, pad32(body))).startswith("<xml>aaa")


def test_length_field_past_data() -> None:
    xml = b"<xml/>"
    over = oa_body(xml, length=len(xml) + len(V4_APPID) + 1)
    assert decrypt_reason(oa_raw_encrypt(V4_KEY, pad32(over))) == "bad length"
    huge = oa_body(xml, length=0xFFFFFFFF)
    assert decrypt_reason(oa_raw_encrypt(V4_KEY, pad32(huge))) == "bad length"
    # Fewer than 20 bytes left after unpadding: no room for random + length.
    assert decrypt_reason(oa_raw_encrypt(V4_KEY, pad32(b"0123456789abcdef"))) == "bad length"


def test_length_field_short_moves_bytes_into_appid() -> None:
    xml = b"<xml/>"
    short = oa_body(xml, length=len(xml) - 1)
    assert decrypt_reason(oa_raw_encrypt(V4_KEY, pad32(short))) == "appid mismatch"


@pytest.mark.parametrize(
    "appid",
    [
        b"wx1234567890abcde",
        b"wx1234567890abcdefg",
        b"WX1234567890ABCDEF",
        b"",
        b"xwx1234567890abcdef",
    ],
)
def test_appid_suffix_must_match_exactly(appid: bytes) -> None:
    plain = pad32(oa_body(b"<xml/>", appid=appid))
    assert decrypt_reason(oa_raw_encrypt(V4_KEY, plain)) == "appid mismatch"


def test_wrong_appid_configured() -> None:
    crypto = MessageCrypto(V4_TOKEN, V4_KEY, "wx0000000000000000")
    assert decrypt_reason(V4_ENCRYPT, crypto) == "appid mismatch"


def test_not_utf8() -> None:
    plain = pad32(oa_body(b"<xml>\xff\xfe</xml>"))
    assert decrypt_reason(oa_raw_encrypt(V4_KEY, plain)) == "not utf-8"


def test_wrong_key_rejected() -> None:
    crypto = MessageCrypto(V4_TOKEN, OTHER_KEY, V4_APPID)
    with pytest.raises(DecryptError):
        crypto.decrypt(V4_ENCRYPT)


# --- key rotation -------------------------------------------------------------------------------


def test_previous_key_fallback() -> None:
    rotated = MessageCrypto(V4_TOKEN, OTHER_KEY, V4_APPID, previous_encoding_aes_key=V4_KEY)
    assert rotated.decrypt(V4_ENCRYPT) == V4_XML
    assert rotated.decrypt_with_key_info(V4_ENCRYPT) == (V4_XML, True)
    fresh = MessageCrypto(V4_TOKEN, OTHER_KEY, V4_APPID).encrypt("<xml>new</xml>")
    assert rotated.decrypt_with_key_info(fresh) == ("<xml>new</xml>", False)
    # Without the previous key the old payload is rejected.
    with pytest.raises(DecryptError):
        MessageCrypto(V4_TOKEN, OTHER_KEY, V4_APPID).decrypt(V4_ENCRYPT)


def test_reply_with_previous_key() -> None:
    rotated = MessageCrypto(V4_TOKEN, OTHER_KEY, V4_APPID, previous_encoding_aes_key=V4_KEY)
    encrypt = rotated.encrypt("<xml>r</xml>", use_previous=True)
    assert v4_crypto().decrypt(encrypt) == "<xml>r</xml>"
    with pytest.raises(DecryptError):
        MessageCrypto(V4_TOKEN, OTHER_KEY, V4_APPID).decrypt(encrypt)
    with pytest.raises(ValueError):
        v4_crypto().encrypt("<xml/>", use_previous=True)


def test_both_keys_fail_reports_current_key_reason() -> None:
    # Valid under the current key except for the appid; garbage under the previous key.
    plain = pad32(oa_body(b"<xml/>", appid=b"wx_someone_else"))
    encrypt = oa_raw_encrypt(V4_KEY, plain)
    rotated = MessageCrypto(V4_TOKEN, V4_KEY, V4_APPID, previous_encoding_aes_key=OTHER_KEY)
    assert decrypt_reason(encrypt, rotated) == "appid mismatch"


# --- reply envelope -----------------------------------------------------------------------------


def test_encrypt_reply_envelope() -> None:
    crypto = v4_crypto()
    reply = crypto.encrypt_reply("<xml><Content>hi</Content></xml>", "1700000001", "nonce42")
    doc = xmltodict.parse(reply)["xml"]
    assert list(doc) == ["Encrypt", "MsgSignature", "TimeStamp", "Nonce"]
    assert doc["TimeStamp"] == "1700000001" and doc["Nonce"] == "nonce42"
    assert "<TimeStamp>1700000001</TimeStamp>" in reply
    assert doc["MsgSignature"] == sign(V4_TOKEN, "1700000001", "nonce42", doc["Encrypt"])
    assert crypto.check_msg_signature(doc["MsgSignature"], "1700000001", "nonce42", doc["Encrypt"])
    assert crypto.decrypt(doc["Encrypt"]) == "<xml><Content>hi</Content></xml>"


def test_encrypt_reply_rejects_injection() -> None:
    with pytest.raises(ValueError):
        v4_crypto().encrypt_reply("<xml/>", "17</TimeStamp>", "n")
    with pytest.raises(ValueError):
        v4_crypto().encrypt_reply("<xml/>", "1700000000", "a]]>b")


# --- secrets stay out of repr -------------------------------------------------------------------


def test_repr_hides_secrets() -> None:
    crypto = MessageCrypto("sekrit-token", V4_KEY, V4_APPID, previous_encoding_aes_key=OTHER_KEY)
    text = repr(crypto) + str(crypto)
    key = decode_aes_key(V4_KEY)
    for secret in ("sekrit-token", V4_KEY, OTHER_KEY[:20], repr(key), key.hex(), repr(key[:16])):
        assert secret not in text
    assert V4_APPID in text


# --- wechatpy interop ---------------------------------------------------------------------------


def test_wechatpy_encrypted_event_decrypts() -> None:
    theirs = WeChatCrypto(V4_TOKEN, V4_KEY, V4_APPID)
    envelope = theirs.encrypt_message(V4_XML, V4_NONCE, V4_TIMESTAMP)
    doc = xmltodict.parse(envelope)["xml"]
    ours = v4_crypto()
    assert ours.check_msg_signature(doc["MsgSignature"], V4_TIMESTAMP, V4_NONCE, doc["Encrypt"])
    assert ours.decrypt(doc["Encrypt"]) == V4_XML


def test_our_reply_decrypts_with_wechatpy() -> None:
    xml = "<xml><Content><![CDATA[你好 ]]]]><![CDATA[> world]]></Content></xml>"
    reply = v4_crypto().encrypt_reply(xml, "1700000002", "998877")
    signature = xmltodict.parse(reply)["xml"]["MsgSignature"]
    theirs = WeChatCrypto(V4_TOKEN, V4_KEY, V4_APPID)
    assert theirs.decrypt_message(reply, signature, "1700000002", "998877") == xml


def test_wechatpy_decrypts_known_answer_vector() -> None:
    theirs = WeChatCrypto(V4_TOKEN, V4_KEY, V4_APPID)
    envelope = f"<xml><Encrypt><![CDATA[{V4_ENCRYPT}]]></Encrypt></xml>"
    assert theirs.decrypt_message(envelope, V4_MSG_SIGNATURE, V4_TIMESTAMP, V4_NONCE) == V4_XML


# --- MP encryptedData ----------------------------------------------------------------------------


def test_vector5_mp_decrypt() -> None:
    data = decrypt_mp_data(V5_SESSION_KEY, V5_DATA, V5_IV, V5_APPID)
    assert data["openId"] == "oGZUI0egBJY1zhBYw2KhdUfwVJJE"
    assert data["unionId"] == "ocMvos6NjeKLIBqg5Mr9QjxrP1FA"
    assert data["watermark"] == {"timestamp": 1477314187, "appid": V5_APPID}
    key, iv = base64.b64decode(V5_SESSION_KEY), base64.b64decode(V5_IV)
    raw = AES.new(key, AES.MODE_CBC, iv=iv).decrypt(base64.b64decode(V5_DATA))
    assert raw[-1] == 7


def test_mp_watermark_mismatch() -> None:
    with pytest.raises(WatermarkError) as info:
        decrypt_mp_data(V5_SESSION_KEY, V5_DATA, V5_IV, "wx0000000000000000")
    assert not isinstance(info.value, SessionKeyError)


@pytest.mark.parametrize(
    "payload",
    [{"openId": "o"}, {"watermark": "wx"}, {"watermark": {"appid": 1}}, {"watermark": {}}],
)
def test_mp_missing_watermark(payload: dict[str, object]) -> None:
    key, data, iv = mp_raw_encrypt(pad16(json.dumps(payload).encode()))
    with pytest.raises(WatermarkError):
        decrypt_mp_data(key, data, iv, "wx1")


def test_mp_crafted_payload_roundtrip() -> None:
    payload = {"phoneNumber": "+86", "watermark": {"appid": "wx1", "timestamp": 1}}
    key, data, iv = mp_raw_encrypt(pad16(json.dumps(payload).encode()))
    assert decrypt_mp_data(key, data, iv, "wx1") == payload


def mp_reason(key: str, data: str, iv: str, appid: str = "wx1") -> str:
    with pytest.raises(SessionKeyError) as info:
        decrypt_mp_data(key, data, iv, appid)
    return str(info.value)


def test_mp_stale_session_key() -> None:
    stale = base64.b64encode(b"0123456789abcdef").decode()
    with pytest.raises(SessionKeyError):
        decrypt_mp_data(stale, V5_DATA, V5_IV, V5_APPID)


def test_mp_bad_base64_and_sizes() -> None:
    assert mp_reason("!!", V5_DATA, V5_IV) == "bad base64 in session_key"
    assert mp_reason(V5_SESSION_KEY, V5_DATA, "r7BX XKkL") == "bad base64 in iv"
    assert mp_reason(V5_SESSION_KEY, V5_DATA + "é", V5_IV) == "bad base64 in encryptedData"
    assert "16 bytes" in mp_reason(base64.b64encode(b"k" * 32).decode(), V5_DATA, V5_IV)
    assert "16 bytes" in mp_reason(V5_SESSION_KEY, V5_DATA, base64.b64encode(b"i" * 8).decode())
    assert mp_reason(V5_SESSION_KEY, V5_DATA[:-4], V5_IV) in {
        "bad length",
        "bad base64 in encryptedData",
    }
    assert mp_reason(V5_SESSION_KEY, base64.b64encode(b"x" * 17).decode(), V5_IV) == "bad length"
    assert mp_reason(V5_SESSION_KEY, "", V5_IV) == "bad length"


@pytest.mark.parametrize("last", [0, 17, 255])
def test_mp_pad_out_of_range(last: int) -> None:
    key, data, iv = mp_raw_encrypt(b"{}" + b" " * 29 + bytes([last]))
    assert mp_reason(key, data, iv) == "bad padding"


def test_mp_pad_of_17_rejected_even_when_consistent() -> None:
    key, data, iv = mp_raw_encrypt(b'{"a":1}' + b" " * 8 + bytes([17]) * 17)
    assert mp_reason(key, data, iv) == "bad padding"


def test_mp_pad_bytes_must_be_equal() -> None:
    key, data, iv = mp_raw_encrypt(b"{}" + b" " * 26 + b"\x04\x04\x03\x04")
    assert mp_reason(key, data, iv) == "bad padding"


def test_mp_full_block_pad_accepted() -> None:
    plain = json.dumps({"watermark": {"appid": "wx1"}, "a": "b" * 8}).encode()
    assert len(plain) % 16 == 0
    key, data, iv = mp_raw_encrypt(plain + bytes([16]) * 16)
    assert decrypt_mp_data(key, data, iv, "wx1")["a"] == "b" * 8


@pytest.mark.parametrize(
    ("plain", "reason"),
    [
        (b"\xff\xfe{}", "not utf-8"),
        (b"hello", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'"s"', "not a JSON object"),
    ],
)
def test_mp_bad_plaintext(plain: bytes, reason: str) -> None:
    key, data, iv = mp_raw_encrypt(pad16(plain))
    assert mp_reason(key, data, iv) == reason


# --- rawData and session signatures -------------------------------------------------------------
# https://developers.weixin.qq.com/miniprogram/dev/framework/open-ability/signature.html
# https://developers.weixin.qq.com/miniprogram/dev/OpenApiDoc/user-login/checkSessionKey.html
# (the session signature of the empty message is self-computed)


def test_vector6_raw_data_signature() -> None:
    raw = (
        '{"nickName":"Band","gender":1,"language":"zh_CN","city":"Guangzhou","province":"Guangdong",'
        '"country":"CN","avatarUrl":"http://wx.qlogo.cn/mmopen/vi_32/1vZvI39NWFQ9XM4LtQpFrQJ1xlgZxx3w'
        '7bQxKARol6503Iuswjjn6nIGBiaycAjAtpujxyzYsrztuuICqIM5ibXQ/0"}'
    )
    signature = raw_data_signature(raw, "HyVFkGl5F5OQWJZZaNzBBg==")
    assert signature == "75e81ceda165f4ffa64f4068af58c64b8f54b88c"


def test_vector7_session_signature() -> None:
    key = "o0q0otL8aEzpcZL/FT9WsQ=="
    assert session_signature(key, '{"foo":"bar"}') == (
        "654571f79995b2ce1e149e53c0a33dc39c0a74090db514261454e8dbe432aa0b"
    )
    assert (
        session_signature(key, "")
        == session_signature(key)
        == ("46e043c5525c2d817c44be603d30837a808a1d930d038f6fdc3e62a201fed128")
    )


# --- properties -----------------------------------------------------------------------------------

ROTATED = MessageCrypto(V4_TOKEN, V4_KEY, V4_APPID, previous_encoding_aes_key=OTHER_KEY)


@given(text=st.text(), prefix=st.binary(min_size=16, max_size=16))
def test_roundtrip_any_text(text: str, prefix: bytes) -> None:
    encrypt = ROTATED.encrypt(text, random_prefix=prefix)
    assert len(base64.b64decode(encrypt)) % 32 == 0
    assert ROTATED.decrypt(encrypt) == text


@given(st.text())
def test_decrypt_arbitrary_strings_only_raises_decrypt_error(encrypt: str) -> None:
    try:
        ROTATED.decrypt(encrypt)
    except DecryptError as exc:
        assert str(exc) in {
            "bad base64",
            "bad length",
            "bad padding",
            "appid mismatch",
            "not utf-8",
        }


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_decrypt_arbitrary_ciphertext_only_raises_decrypt_error(data: bytes) -> None:
    try:
        ROTATED.decrypt(base64.b64encode(data).decode())
    except DecryptError:
        pass


@given(key=st.binary(max_size=20), data=st.binary(max_size=100), iv=st.binary(max_size=20))
def test_mp_decrypt_arbitrary_input_only_raises_mp_errors(key: bytes, data: bytes, iv: bytes) -> None:
    try:
        decrypt_mp_data(b64(key), b64(data), b64(iv), "wx1")
    except MiniProgramError:
        pass
