"""What the DICOM node and the file writer share: SOP classes, transfer syntaxes, keys, peers, log hygiene."""

from __future__ import annotations

import hashlib
import logging
import re
import socket
import warnings
from dataclasses import dataclass

from pydicom.uid import UID

#: Burned into every secondary capture and written into every SR.
BURNED_NOTICE = "RESEARCH USE ONLY — NOT FOR DIAGNOSIS"
#: Manufacturer of every object covidcxr writes; the node recognises its own results by it.
MANUFACTURER = "covidcxr"
#: Private coding scheme for concepts DICOM has no code for (class probabilities, the operating point).
SCHEME = "99COVIDCXR"
#: Series numbers of the result series (high, so that they sort after the acquisition series).
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902

CR_IMAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
DX_PROCESSING = UID("1.2.840.10008.5.1.4.1.1.1.1.1")
SECONDARY_CAPTURE = UID("1.2.840.10008.5.1.4.1.1.7")
COMPREHENSIVE_SR = UID("1.2.840.10008.5.1.4.1.1.88.33")
#: Image storage SOP classes accepted: CR, DX (for presentation and for processing), secondary captures.
ACCEPTED_SOP_CLASSES = (CR_IMAGE, DX_PRESENTATION, DX_PROCESSING, SECONDARY_CAPTURE)


class DicomNodeError(RuntimeError):
    """A configuration or start-up problem of the DICOM node, said in one line."""


def decodable_transfer_syntaxes() -> list[UID]:
    """Transfer syntaxes whose pixel data this installation decodes (what covidcxr.io reads).

    Asked of pydicom's decoders at run time, so a missing codec plugin narrows what is accepted
    instead of accepting images that then fail. Uncompressed syntaxes come first (preferred).
    """
    from pydicom.pixels import get_decoder
    from pydicom.uid import AllTransferSyntaxes

    first = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"]
    out: list[UID] = []
    for uid in first + [u for u in AllTransferSyntaxes if u not in first]:
        try:
            if get_decoder(uid).is_available:
                out.append(UID(uid))
        except Exception:  # no decoder registered for this syntax (e.g. JPIP referenced)
            continue
    return out


def instance_key(sop_instance_uid: str, salt: str = "") -> str:
    """A 20-hex-digit key for an instance: file names and log lines carry this, never the UID itself."""
    return hashlib.sha256(f"{salt}|{sop_instance_uid}".encode()).hexdigest()[:20]


def derived_uid(*parts: str) -> str:
    """A UID derived from ``parts`` (2.25 form): a retried result gets the same UIDs, so the PACS keeps one copy."""
    # 2.25.<128-bit integer> (PS3.5 B.2); pydicom's generate_uid ignores entropy_srcs without a prefix
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:32]
    return f"2.25.{int(digest, 16)}"


@dataclass(frozen=True)
class Peer:
    """A remote application entity: ``AE@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # 16 printable chars, no backslash


def check_ae_title(title: str) -> str:
    title = title.strip()
    if not _AE_RE.match(title):
        raise DicomNodeError(f"AE title {title!r}: 1-16 printable ASCII characters, no backslash")
    return title


def parse_peer(text: str) -> Peer:
    """``PACS_AE@127.0.0.1:4242`` -> Peer; a one-line DicomNodeError otherwise."""
    m = re.match(r"^([^@]+)@(.+):(\d+)$", text.strip())
    if not m:
        raise DicomNodeError(f"{text!r}: expected AE_TITLE@HOST:PORT, e.g. PACS@127.0.0.1:4242")
    port = int(m.group(3))
    if not 0 < port < 65536:
        raise DicomNodeError(f"{text!r}: port {port} is outside 1-65535")
    return Peer(check_ae_title(m.group(1)), m.group(2), port)


@dataclass(frozen=True)
class AllowRule:
    """Who may open an association: an AE title (``*`` for any) and optionally a host."""

    ae_title: str
    host: str | None = None

    @classmethod
    def parse(cls, text: str) -> "AllowRule":
        """``AE``, ``AE@HOST`` or ``*@HOST``; the host is resolved once, here."""
        ae, _, host = text.strip().partition("@")
        ae = ae.strip() or "*"
        if ae != "*":
            check_ae_title(ae)
        return cls(ae, resolve_host(host) if host else None)

    def matches(self, ae_title: str, address: str) -> bool:
        return (self.ae_title == "*" or self.ae_title == ae_title.strip()) and (
            self.host is None or self.host == address
        )

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}" if self.host else self.ae_title


def resolve_host(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError as err:
        raise DicomNodeError(f"cannot resolve host {host!r} ({err})") from None


def quiet_dicom_libraries() -> None:
    """Keep pydicom/highdicom/pynetdicom from writing header values (names, IDs, UIDs) to logs or stderr.

    pydicom warns about invalid values quoting them ('Invalid value for VR DA: <birth date>'), highdicom
    warns quoting the patient name, and pynetdicom logs UIDs at DEBUG. Their warnings are ignored outside
    covidcxr.io's own reads (which collect pydicom's notes for their error messages), and pynetdicom is
    silenced: the node logs what matters (refused peers, unreachable destination) itself. The node's own log lines carry instance keys only. Safe to call twice.
    """
    warnings.filterwarnings("ignore", module=r"(pydicom|highdicom|pynetdicom)(\.|$)")
    # pynetdicom logs every refused connection as two ERROR lines; the node says it once, in its own words
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    logging.getLogger("highdicom").setLevel(logging.ERROR)  # its INFO/DEBUG lines quote UIDs


def safe_reason(err: BaseException) -> str:
    """A failure reason fit for logs: our own messages as they are, library messages by type only.

    Library exception texts may quote header values (a patient name in a validation error).
    """
    from covidcxr.io import CXRReadError

    if isinstance(err, (CXRReadError, DicomNodeError)):
        return str(err)
    return f"{type(err).__name__} while building or sending the result"
