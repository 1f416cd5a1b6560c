"""The EncodingAESKey rule, the one check shared by config validation and wxd.wechat.crypto.

Base: standard library only, so both the configuration and the protocol layer may import it.
"""

from __future__ import annotations

import base64
import binascii


def check_aes_key(value: str) -> None:
    """Raise ValueError unless `value` is 43 characters of [A-Za-z0-9] decoding (with '=') to 32 bytes.

    WeChat's EncodingAESKey is the base64 of the 32-byte AES key without its one '=' of padding:
    https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Message_encryption_and_decryption_instructions.html
    The error message never contains the key.
    """
    if len(value) != 43:
        raise ValueError(f"must be 43 characters, got {len(value)}")
    if not value.isascii() or not value.isalnum():
        raise ValueError("must contain only letters and digits")
    try:
        key = base64.b64decode(value + "=", validate=True)
    except binascii.Error:
        raise ValueError("is not valid base64") from None
    if len(key) != 32:
        raise ValueError("must decode to 32 bytes")
