"""WeChat signatures, OA message encryption (AES-256-CBC) and MP encryptedData (AES-128-CBC).

Pure and synchronous: stdlib, wxd.errors and pycryptodome only; never tornado/aiosqlite.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
from typing import Any

from Crypto.Cipher import AES

from wxd.aeskey import check_aes_key
from wxd.errors import DecryptError, SessionKeyError, WatermarkError

# The OA scheme pads to 32 bytes, not to the 16-byte AES block.
# https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Message_encryption_and_decryption_instructions.html
_OA_PAD_BLOCK = 32
_MP_PAD_BLOCK = 16
_RANDOM_LEN = 16
_LEN_FIELD = 4
_TIMESTAMP_RE = re.compile(r"[0-9]{1,20}")

_REPLY_TEMPLATE = (
    "<xml>\n"
    "<Encrypt><![CDATA[{encrypt}]]></Encrypt>\n"
    "<MsgSignature><![CDATA[{signature}]]></MsgSignature>\n"
    "<TimeStamp>{timestamp}</TimeStamp>\n"
    "<Nonce><![CDATA[{nonce}]]></Nonce>\n"
    "</xml>"
)


def sign(*parts: str) -> str:
    """Return the lowercase sha1 hex of the parts sorted as strings and joined with no separator.

    This is both the URL `signature` (token, timestamp, nonce) and the `msg_signature`
    (token, timestamp, nonce, Encrypt exactly as received).
    """
    # SHA-1 is mandated by WeChat's protocol; it is not our choice.
    return hashlib.sha1("".join(sorted(parts)).encode("utf-8")).hexdigest()  # noqa: S324


def check_signature(expected: str, *parts: str) -> bool:
    """Compare `expected` with sign(*parts) in constant time.

    False for an empty or non-ASCII `expected` (hmac.compare_digest rejects non-ASCII str).
    The comparison is exact: WeChat sends lowercase hex.
    """
    if not expected or not expected.isascii():
        return False
    return hmac.compare_digest(expected, sign(*parts))


def decode_aes_key(encoding_aes_key: str) -> bytes:
    """Decode an EncodingAESKey into the 32-byte AES key.

    The key must be exactly 43 characters of [A-Za-z0-9]; base64 of it plus "=" gives 32 bytes.
    Raises ValueError naming the problem; the message never contains the key.
    """
    try:
        check_aes_key(encoding_aes_key)  # the same rule `wxd check-config` applies
    except ValueError as exc:
        raise ValueError(f"EncodingAESKey {exc}") from None
    return base64.b64decode(encoding_aes_key + "=", validate=True)


def _b64decode(text: str) -> bytes:
    """Strict base64 decode; raises ValueError (binascii.Error is a subclass) on any problem."""
    return base64.b64decode(text.encode("ascii"), validate=True)


def _unpad(data: bytes, block: int) -> bytes | None:
    """Remove PKCS#7 padding (pad value 1..block, all pad bytes equal); None when invalid."""
    if not data:
        return None
    pad = data[-1]
    if pad < 1 or pad > block or pad > len(data):
        return None
    if data[-pad:] != bytes([pad]) * pad:
        return None
    return data[:-pad]


def _pad(data: bytes, block: int) -> bytes:
    pad = block - len(data) % block
    return data + bytes([pad]) * pad


def _cbc_decrypt(ecb: Any, iv: bytes, data: bytes) -> bytes:
    """CBC decryption as one ECB pass plus one XOR with the shifted ciphertext (P_i = D(C_i) ^
    C_(i-1), C_0 = iv). Same result as a CBC cipher, without building one per message: cheaper,
    and the webhook decrypts every request. `data` is a non-empty multiple of 16."""
    blocks = ecb.decrypt(data)
    chained = int.from_bytes(blocks, "big") ^ int.from_bytes(iv + data[:-16], "big")
    return chained.to_bytes(len(data), "big")


class MessageCrypto:
    """OA message encryption: AES-256-CBC with iv = key[:16] and 32-byte PKCS#7 padding.

    Plaintext layout: random(16) | len(xml) as 4 bytes big-endian | xml (UTF-8) | appid.
    When the EncodingAESKey is rotated, pass the old one as `previous_encoding_aes_key`;
    decrypt then falls back to it. Raises ValueError for a malformed key.
    """

    def __init__(
        self,
        token: str,
        encoding_aes_key: str,
        appid: str,
        previous_encoding_aes_key: str | None = None,
    ) -> None:
        self._token = token
        self._appid = appid
        self._appid_bytes = appid.encode("utf-8")
        self._key = decode_aes_key(encoding_aes_key)
        self._previous_key = (
            decode_aes_key(previous_encoding_aes_key) if previous_encoding_aes_key is not None else None
        )
        # ECB is stateless, so one cipher per key serves every request (see _cbc_decrypt).
        self._ecb = {key: AES.new(key, AES.MODE_ECB)
                     for key in (self._key, self._previous_key) if key is not None}

    def __repr__(self) -> str:
        previous = "set" if self._previous_key is not None else "unset"
        return f"MessageCrypto(appid={self._appid!r}, previous_key={previous})"

    @property
    def appid(self) -> str:
        """The appid every decrypted message must end with."""
        return self._appid

    def decrypt(self, encrypt: str) -> str:
        """Return the inner XML text of an Encrypt value.

        Tries the current key, then the previous one. Raises DecryptError with a short reason
        ("bad base64", "bad length", "bad padding", "appid mismatch", "not utf-8"); when both
        keys fail, the reason is the current key's.
        """
        return self.decrypt_with_key_info(encrypt)[0]

    def decrypt_with_key_info(self, encrypt: str) -> tuple[str, bool]:
        """Like decrypt, and also report whether the previous key was the one that worked.

        WeChat's FAQ asks to reply with whichever key decrypted the request (use_previous=...).
        """
        try:
            data = _b64decode(encrypt)
        except (ValueError, UnicodeError):
            raise DecryptError("bad base64") from None
        if not data or len(data) % AES.block_size:
            raise DecryptError("bad length")
        try:
            return self._decrypt_with(self._key, data), False
        except DecryptError as current_error:
            if self._previous_key is None:
                raise
            try:
                return self._decrypt_with(self._previous_key, data), True
            except DecryptError:
                raise current_error from None

    def _decrypt_with(self, key: bytes, data: bytes) -> str:
        plain = _cbc_decrypt(self._ecb[key], key[:16], data)
        body = _unpad(plain, _OA_PAD_BLOCK)
        if body is None:
            raise DecryptError("bad padding")
        header = _RANDOM_LEN + _LEN_FIELD
        if len(body) < header:
            raise DecryptError("bad length")
        length = int.from_bytes(body[_RANDOM_LEN:header], "big")
        if length > len(body) - header:
            raise DecryptError("bad length")
        xml = body[header : header + length]
        if not hmac.compare_digest(body[header + length :], self._appid_bytes):
            raise DecryptError("appid mismatch")
        try:
            return xml.decode("utf-8")
        except UnicodeDecodeError:
            raise DecryptError("not utf-8") from None

    def encrypt(
        self,
        xml: str,
        random_prefix: bytes | None = None,
        *,
        use_previous: bool = False,
    ) -> str:
        """Return the base64 Encrypt value for `xml`.

        `random_prefix` (exactly 16 bytes) replaces the random bytes; only tests should pass it.
        `use_previous` encrypts with the previous key (ValueError if there is none).
        """
        if random_prefix is None:
            random_prefix = os.urandom(_RANDOM_LEN)
        if len(random_prefix) != _RANDOM_LEN:
            raise ValueError("random_prefix must be 16 bytes")
        key = self._select_key(use_previous)
        payload = xml.encode("utf-8")
        plain = random_prefix + len(payload).to_bytes(_LEN_FIELD, "big") + payload + self._appid_bytes
        cipher = AES.new(key, AES.MODE_CBC, iv=key[:16])
        return base64.b64encode(cipher.encrypt(_pad(plain, _OA_PAD_BLOCK))).decode("ascii")

    def _select_key(self, use_previous: bool) -> bytes:
        if not use_previous:
            return self._key
        if self._previous_key is None:
            raise ValueError("no previous EncodingAESKey configured")
        return self._previous_key

    def check_msg_signature(self, msg_signature: str, timestamp: str, nonce: str, encrypt: str) -> bool:
        """Check msg_signature (not `signature`) over token, timestamp, nonce and Encrypt."""
        return check_signature(msg_signature, self._token, timestamp, nonce, encrypt)

    def encrypt_reply(self, xml: str, timestamp: str, nonce: str, *, use_previous: bool = False) -> str:
        """Return the encrypted passive-reply envelope (Encrypt, MsgSignature, TimeStamp, Nonce).

        `timestamp` must be decimal digits; `nonce` must not contain "]]>" (ValueError).
        """
        if not _TIMESTAMP_RE.fullmatch(timestamp):
            raise ValueError("timestamp must be decimal digits")
        if "]]>" in nonce:
            raise ValueError("nonce must not contain ']]>'")
        encrypt = self.encrypt(xml, use_previous=use_previous)
        signature = sign(self._token, timestamp, nonce, encrypt)
        return _REPLY_TEMPLATE.format(encrypt=encrypt, signature=signature, timestamp=timestamp, nonce=nonce)


def decrypt_mp_data(session_key: str, encrypted_data: str, iv: str, appid: str) -> dict[str, Any]:
    """Decrypt Mini Program encryptedData into its JSON object.

    AES-128-CBC, key = b64(session_key), iv = b64(iv), 16-byte PKCS#7. Any decoding, size,
    padding, UTF-8 or JSON failure raises SessionKeyError: it almost always means the stored
    session_key is stale (wx.login ran after the data was produced), so the client must log in
    again. WatermarkError when watermark.appid is missing or differs from `appid`.
    """
    decoded: list[bytes] = []
    fields = (("session_key", session_key), ("iv", iv), ("encryptedData", encrypted_data))
    for name, value in fields:
        try:
            decoded.append(_b64decode(value))
        except (ValueError, UnicodeError):
            raise SessionKeyError(f"bad base64 in {name}") from None
    key, iv_bytes, data = decoded
    if len(key) != 16:
        raise SessionKeyError("session_key must decode to 16 bytes")
    if len(iv_bytes) != 16:
        raise SessionKeyError("iv must decode to 16 bytes")
    if not data or len(data) % AES.block_size:
        raise SessionKeyError("bad length")
    plain = _unpad(AES.new(key, AES.MODE_CBC, iv=iv_bytes).decrypt(data), _MP_PAD_BLOCK)
    if plain is None:
        raise SessionKeyError("bad padding")
    try:
        text = plain.decode("utf-8")
    except UnicodeDecodeError:
        raise SessionKeyError("not utf-8") from None
    try:
        obj = json.loads(text)
    except ValueError:  # json.JSONDecodeError, and RecursionError is not expected at this size
        raise SessionKeyError("not JSON") from None
    if not isinstance(obj, dict):
        raise SessionKeyError("not a JSON object")
    watermark = obj.get("watermark")
    if not isinstance(watermark, dict) or not isinstance(watermark.get("appid"), str):
        raise WatermarkError("missing watermark appid")
    if not hmac.compare_digest(watermark["appid"].encode("utf-8"), appid.encode("utf-8")):
        raise WatermarkError("watermark appid mismatch")
    return obj


def raw_data_signature(raw_data: str, session_key: str) -> str:
    """Return sha1_hex(rawData + session_key): plain concatenation, no sorting (wx.getUserInfo)."""
    return hashlib.sha1((raw_data + session_key).encode("utf-8")).hexdigest()  # noqa: S324


def session_signature(session_key: str, message: str = "") -> str:
    """Return HMAC-SHA256 hex over `message`, keyed with the session_key *string's* bytes.

    The key is the base64 text as returned by code2Session, not its decoded bytes;
    /wxa/checksession wants message "".
    """
    return hmac.new(session_key.encode("utf-8"), message.encode("utf-8"), hashlib.sha256).hexdigest()


__all__ = [
    "MessageCrypto",
    "check_signature",
    "decode_aes_key",
    "decrypt_mp_data",
    "raw_data_signature",
    "session_signature",
    "sign",
]
