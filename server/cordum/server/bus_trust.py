"""Our bus signing key, the senders we trust, and the verify mode: one `BusTrust` per App.

CAP packets (``BusPacket``) are signed the CAP way (:mod:`cordum.sdk.cap`): ECDSA P-256 over
SHA-256, DER in field 14, computed over the deterministic encoding without field 14, so a CAP
2.17 worker given our public key verifies our dispatches. Our own messages that are not
BusPackets (job events, run events, run advances, policy events) have no signature field;
they carry the same kind of signature over their body in two NATS headers,
``Cordum-Sender`` and ``Cordum-Signature`` (base64 DER). CAP workers never see those: they
neither use headers nor subscribe to our subjects, and CAP packets get no headers.

Neither form binds the subject (CAP's does not): a signature says who wrote the bytes.

Our own key is trusted for every sender id we speak under (the gateway, the scheduler and the
workflow engine use different ones; only we hold the key), on top of ``bus_public_keys``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cordum.sdk import cap
from cordum.server.settings import Settings

SENDER_HEADER: Final = "Cordum-Sender"
SIGNATURE_HEADER: Final = "Cordum-Signature"

_ECDSA: Final = ec.ECDSA(hashes.SHA256())


class BusTrust:
    """Signs what we publish (when we have a key) and checks what we receive (``require``).

    ``BusTrust()`` is the default of every service: no key, nothing checked.
    """

    def __init__(
        self,
        *,
        signer: cap.Signer | None = None,
        sender_id: str = "",
        public_keys: Mapping[str, ec.EllipticCurvePublicKey] | None = None,
        require: bool = False,
    ) -> None:
        if require and signer is None:
            # The control plane reads its own messages (job events, bus submits, cancels):
            # requiring signatures without signing would drop every one of them.
            raise ValueError("bus_verify=require needs our own key (bus_private_key[_file])")
        self._signer = signer
        self._sender_id = sender_id
        self.require = require
        self._own = signer.public_key if signer is not None else None
        self._keys = dict(public_keys or {})
        if self._own is not None and sender_id:
            self._keys.setdefault(sender_id, self._own)

    @classmethod
    def from_settings(cls, settings: Settings) -> BusTrust:
        """Loads the keys named by the settings; ``ValueError`` names what is wrong."""
        return cls(
            signer=_load_signer(settings),
            sender_id=settings.sender_id,
            public_keys=load_public_keys(settings.bus_public_keys)
            if settings.bus_public_keys is not None
            else {},
            require=settings.bus_verify == "require",
        )

    @property
    def signs(self) -> bool:
        return self._signer is not None

    @property
    def senders(self) -> list[str]:
        """The sender ids we hold a public key for (ours included)."""
        return sorted(self._keys)

    # -- outbound --------------------------------------------------------------------------

    def encode(self, packet: cap.BusPacket) -> bytes:
        """A CAP packet's bytes: validated, deterministic, signed when we have a key."""
        return cap.encode(packet, signer=self._signer)

    def headers(self, data: bytes) -> dict[str, str] | None:
        """NATS headers that sign one of our non-CAP messages (``None`` without a key)."""
        if self._signer is None:
            return None
        signature = base64.b64encode(self._signer.sign(data)).decode()
        return {SENDER_HEADER: self._sender_id, SIGNATURE_HEADER: signature}

    # -- inbound ---------------------------------------------------------------------------

    def check_packet(self, packet: cap.BusPacket) -> None:
        """Raise ``cap.PacketError`` (``missing_signature``, ``unknown_sender``,
        ``bad_signature``) unless the packet's field-14 signature verifies."""
        if not packet.signature:
            raise cap.PacketError("missing_signature", f"packet from {packet.sender_id!r}")
        unsigned = cap.BusPacket()
        unsigned.CopyFrom(packet)
        unsigned.ClearField("signature")
        self._verify(
            packet.sender_id, packet.signature, unsigned.SerializeToString(deterministic=True)
        )

    def check_message(self, headers: Mapping[str, str] | None, data: bytes) -> None:
        """Like :meth:`check_packet`, for a non-CAP message signed in its headers."""
        headers = headers or {}
        encoded = headers.get(SIGNATURE_HEADER, "")
        sender = headers.get(SENDER_HEADER, "")
        if not encoded:
            raise cap.PacketError("missing_signature", f"message from {sender!r}")
        try:
            signature = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            detail = f"signature of {sender!r} is not base64"
            raise cap.PacketError("bad_signature", detail) from exc
        self._verify(sender, signature, data)

    def _verify(self, sender: str, signature: bytes, data: bytes) -> None:
        key = self._keys.get(sender)
        if key is not None and _valid(key, signature, data):
            return
        if self._own is not None and key is not self._own and _valid(self._own, signature, data):
            return
        if key is None:
            raise cap.PacketError("unknown_sender", f"no public key for sender {sender!r}")
        raise cap.PacketError("bad_signature", f"signature of {sender!r} does not verify")


def _valid(key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> bool:
    try:
        key.verify(signature, data, _ECDSA)
    except (InvalidSignature, ValueError):
        return False
    return True


def _load_signer(settings: Settings) -> cap.Signer | None:
    inline = settings.bus_private_key.get_secret_value().strip()
    path = settings.bus_private_key_file
    if inline and path is not None:
        raise ValueError("set bus_private_key or bus_private_key_file, not both")
    if path is not None:
        inline = path.read_text()
    if not inline:
        return None
    try:
        return cap.Signer.from_pem(inline)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"bus private key: not an ECDSA P-256 PEM private key ({exc})") from exc


def load_public_keys(path: Path) -> dict[str, ec.EllipticCurvePublicKey]:
    """``sender_id -> key`` from a directory of ``<sender_id>.pem`` files, or from a YAML/JSON
    file mapping sender ids to PEM text."""
    if path.is_dir():
        pems = {file.stem: file.read_text() for file in sorted(path.glob("*.pem"))}
    else:
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in loaded.items()
        ):
            raise ValueError(f"{path}: expected a mapping of sender_id to PEM public key")
        pems = loaded
    return {sender: _public_key(sender, pem) for sender, pem in pems.items()}


def _public_key(sender: str, pem: str) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except ValueError as exc:
        raise ValueError(f"public key of {sender!r}: not a PEM public key") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"public key of {sender!r}: CAP signatures need an ECDSA P-256 key")
    return key
