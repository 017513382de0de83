"""The TPM: PCR extend/read, an attestation key, quotes, credential activation (host side).

tpm2-pytss types never leave this module: callers see bytes (marshalled TPM
structures where a verifier needs them), ints and frozen dataclasses. Every
TSS/TPM failure becomes a `TpmError` carrying the TPM's own code (`.rc`) and
its decoded meaning (`.detail`).

`open_tpm` picks `/dev/tpmrm0` (the kernel's resource manager) when present,
otherwise starts cwlite's embedded swtpm under the data dir.

The attestation key (AK) is a restricted signing key: a primary key of the
endorsement hierarchy (ECC P-256 by default, RSA-2048 on request), made
persistent so its name is stable across daemon restarts. A verifier binds it
to the EK with `make_credential` (pure software) and the TPM's
`activate_credential`.

What a verifier does with these bytes (`verify_quote`, `make_credential`, key
names) is pure Python in controlplane.core.quote: it needs no TSS.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss import utils as tss_utils
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_PT, TPM2_SE, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMS_PCR_SELECTION,
    TPMT_HA,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
)

from controlplane.core.errors import TpmError
from controlplane.core.paths import TPM_DEVICE
from controlplane.core.quote import (
    PCR_COUNT,
    SHA256_SIZE,
    Quote,
    ak_name_of,
    parse_quote_attest,
    pcr_composite_digest,
)
from controlplane.host.swtpm import Swtpm

# ESYS prints its own error lines to stderr; cwlite reports each failure once, as a TpmError.
os.environ.setdefault("TSS2_LOG", "all+NONE")

# Persistent handles for the AK (owner range, outside the TCG EK range 0x81010000-0x8101ffff).
AK_HANDLES: Mapping[str, int] = {"ecc": 0x81000C10, "rsa": 0x81000C11}
RSA_EK_HANDLE = 0x81010001          # TCG EK Credential Profile: persistent RSA-2048 EK
_PT_FIRMWARE_VERSION_1 = int(TPM2_PT.FIXED) + 11   # TPM2_PT_FIRMWARE_VERSION_1 (pytss names no constant)
_AK_ATTRS = (
    TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.NODA
)
_AK_ALGS: Mapping[str, str] = {"ecc": "ecc256:ecdsa-sha256:null", "rsa": "rsa2048:rsassa-sha256:null"}


# ---------------------------------------------------------------------------------------------
# The TPM itself.

def _pcr_selection(pcrs: Sequence[int]) -> TPML_PCR_SELECTION:
    for pcr in pcrs:
        if not 0 <= pcr < PCR_COUNT:
            raise TpmError(f"PCR {pcr}: out of range 0..{PCR_COUNT - 1}")
    bitmap = bytearray(3)
    for pcr in pcrs:
        bitmap[pcr // 8] |= 1 << (pcr % 8)
    return TPML_PCR_SELECTION([TPMS_PCR_SELECTION(hash=TPM2_ALG.SHA256, sizeofSelect=3, pcrSelect=bytes(bitmap))])


def _der_length(cert: bytes) -> bytes:
    """An NV certificate without the padding some TPMs append after the DER SEQUENCE."""
    if len(cert) < 2 or cert[0] != 0x30:
        return cert
    n = cert[1]
    if n < 0x80:
        return cert[: 2 + n]
    k = n & 0x7F
    return cert[: 2 + k + int.from_bytes(cert[2: 2 + k], "big")]


@dataclass(frozen=True)
class ClockInfo:
    clock: int
    reset_count: int
    restart_count: int
    safe: bool


class Tpm:
    """One TPM connection (context manager). Calls are serialised: ESAPI contexts are not thread-safe."""

    def __init__(self, tcti: str, *, ak_alg: str = "ecc", swtpm=None) -> None:
        if ak_alg not in AK_HANDLES:
            raise TpmError(f"ak_alg: {ak_alg!r} (choose ecc or rsa)")
        self.tcti = tcti
        self.swtpm = swtpm
        self.ak_alg = ak_alg
        self._lock = threading.RLock()
        self._ek: ESYS_TR | None = None
        self._ek_flush = False
        try:
            self._ectx = ESAPI(tcti)
        except TSS2_Exception as exc:
            raise TpmError(f"{tcti}: cannot connect: {exc}", rc=int(exc.rc), detail=str(exc)) from exc
        try:
            self._ak, self._ak_public = self._load_ak()
        except BaseException:
            self._ectx.close()
            raise

    # -- plumbing ---------------------------------------------------------------------------
    @contextmanager
    def _tss(self, what: str, handle: str = "") -> Iterator[None]:
        """Serialise one TPM command and map its failure to TpmError (rc + decoded text)."""
        with self._lock:
            if self._ectx is None:
                raise TpmError(f"{self.tcti}: {what}: the TPM connection is closed")
            try:
                yield
            except TSS2_Exception as exc:
                rc = int(exc.rc)
                died = self.swtpm.exit_status() if self.swtpm is not None else None
                why = f" (the embedded swtpm exited with status {died})" if died is not None else ""
                raise TpmError(f"{self.tcti}: {what}: {exc} (rc 0x{rc:x}){why}", rc=rc, detail=str(exc),
                               handle=handle) from exc

    def close(self) -> None:
        with self._lock:
            if self._ectx is None:
                return
            try:
                if self._ek is not None and self._ek_flush:
                    self._ectx.flush_context(self._ek)
            except TSS2_Exception:
                pass
            self._ectx.close()
            self._ectx = None
        if self.swtpm is not None:
            self.swtpm.stop()

    def __enter__(self) -> "Tpm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- keys ----------------------------------------------------------------------------------
    def _persistent(self, handle: int) -> ESYS_TR | None:
        """An ESYS handle for a persistent object, or None when nothing is stored there."""
        with self._tss("GetCapability HANDLES", f"0x{handle:08x}"):
            _, data = self._ectx.get_capability(TPM2_CAP.HANDLES, handle, 1)
            if handle not in [int(h) for h in data.data.handles.handle]:
                return None
            return self._ectx.tr_from_tpmpublic(handle)

    def _load_ak(self) -> tuple[ESYS_TR, bytes]:
        """The persisted AK, created (primary under the endorsement hierarchy) and persisted on first use."""
        handle = AK_HANDLES[self.ak_alg]
        template = TPM2B_PUBLIC.parse(_AK_ALGS[self.ak_alg], objectAttributes=_AK_ATTRS, nameAlg="sha256")
        tr = self._persistent(handle)
        if tr is not None:
            with self._tss("ReadPublic AK", f"0x{handle:08x}"):
                pub, _, _ = self._ectx.read_public(tr)
            area = pub.publicArea
            if area.type != template.publicArea.type or area.objectAttributes != _AK_ATTRS:
                raise TpmError(f"{self.tcti}: persistent handle 0x{handle:08x} holds another key, not cwlite's "
                               f"{self.ak_alg} AK (evict it with tpm2_evictcontrol)", handle=f"0x{handle:08x}")
            return tr, pub.marshal()
        with self._tss("CreatePrimary AK (endorsement hierarchy)", "endorsement"):
            transient, pub, _, _, _ = self._ectx.create_primary(None, template, ESYS_TR.ENDORSEMENT)
        try:
            with self._tss("EvictControl AK", f"0x{handle:08x}"):
                tr = self._ectx.evict_control(ESYS_TR.OWNER, transient, handle)
        finally:
            with self._tss("FlushContext"):
                self._ectx.flush_context(transient)
        return tr, pub.marshal()

    def _ek_handle(self) -> ESYS_TR:
        """The RSA-2048 EK: persisted at 0x81010001 when the TPM has one, else recreated from its template."""
        if self._ek is not None:
            return self._ek
        self._ek = self._persistent(RSA_EK_HANDLE)
        if self._ek is not None:
            return self._ek
        with self._tss("CreatePrimary EK", "endorsement"):
            _, template = tss_utils.create_ek_template("EK-RSA2048", tss_utils.NVReadEK(self._ectx))
            self._ek, _, _, _, _ = self._ectx.create_primary(None, template, ESYS_TR.ENDORSEMENT)
        self._ek_flush = True
        return self._ek

    def ak_public(self) -> bytes:
        """The AK's marshalled TPM2B_PUBLIC (what the verifier enrols and checks quotes with)."""
        return self._ak_public

    def ak_name(self) -> bytes:
        """The AK's TPM name (sha256 nameAlg || digest of its public area)."""
        return ak_name_of(self._ak_public)

    def ek_public(self) -> bytes:
        """The RSA-2048 EK's marshalled TPM2B_PUBLIC. TPM commands: TPM2_ReadPublic (TPM2_CreatePrimary once)."""
        ek = self._ek_handle()
        with self._tss("ReadPublic EK", f"0x{RSA_EK_HANDLE:08x}"):
            pub, _, _ = self._ectx.read_public(ek)
        return pub.marshal()

    def ek_certificate(self) -> bytes | None:
        """The RSA EK certificate (DER) from NV 0x01c00002, or None when the TPM has none. TPM command: TPM2_NV_Read."""
        with self._tss("NV_Read EK certificate", "0x01c00002"):
            try:
                cert, _ = tss_utils.create_ek_template("EK-RSA2048", tss_utils.NVReadEK(self._ectx))
            except tss_utils.NoSuchIndex:
                return None
        return _der_length(cert) if cert else None

    def activate_credential(self, credential_blob: bytes, secret: bytes) -> bytes:
        """TPM2_ActivateCredential with the AK and the EK (EK policy: PolicySecret(endorsement))."""
        try:
            blob, _ = TPM2B_ID_OBJECT.unmarshal(credential_blob)
            enc, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(secret)
        except (TSS2_Exception, ValueError, TypeError) as exc:
            raise TpmError(f"activate_credential: credential blob or secret malformed: {exc}") from exc
        ek = self._ek_handle()
        with self._tss("ActivateCredential", "ek"):
            session = self._ectx.start_auth_session(
                ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY,
                TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256)
            try:
                self._ectx.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
                cert_info = self._ectx.activate_credential(
                    self._ak, ek, blob, enc, session1=ESYS_TR.PASSWORD, session2=session)
            finally:
                self._ectx.flush_context(session)
        return bytes(cert_info)

    # -- PCRs ----------------------------------------------------------------------------------
    def extend(self, pcr: int, digest: bytes) -> None:
        """TPM2_PCR_Extend of one SHA-256 digest into `pcr` (sha256 bank)."""
        if len(digest) != SHA256_SIZE:
            raise TpmError(f"PCR {pcr}: extend digest is {len(digest)} bytes, want {SHA256_SIZE}")
        if not 0 <= pcr < PCR_COUNT:
            raise TpmError(f"PCR {pcr}: out of range 0..{PCR_COUNT - 1}")
        ha = TPMT_HA(hashAlg=TPM2_ALG.SHA256)
        ha.digest.sha256 = digest
        values = TPML_DIGEST_VALUES([ha])
        with self._tss(f"PCR_Extend {pcr}", f"pcr{pcr}"):
            self._ectx.pcr_extend(ESYS_TR.PCR0 + pcr, values)

    def read_pcrs(self, pcrs: Sequence[int]) -> dict[int, bytes]:
        """PCR values (sha256 bank) of several PCRs; a PCR the TPM leaves out is an error. TPM2_PCR_Read."""
        out: dict[int, bytes] = {}
        want = sorted(set(pcrs))
        with self._tss("PCR_Read"):
            for i in range(0, len(want), 8):   # the TPM returns at most 8 digests per call
                chunk = want[i: i + 8]
                _, sel, digests = self._ectx.pcr_read(_pcr_selection(chunk))
                got = [p for s in sel for p in range(24) if bytes(s.pcrSelect)[p // 8] >> (p % 8) & 1]
                out.update({p: bytes(d) for p, d in zip(got, digests)})
        missing = [p for p in want if p not in out]
        if missing:
            raise TpmError(f"PCR {missing[0]}: the TPM has no sha256 bank value for it (bank not allocated?)")
        return out

    def read_pcr(self, pcr: int) -> bytes:
        """One PCR value (sha256 bank)."""
        return self.read_pcrs([pcr])[pcr]

    def reset_pcr(self, pcr: int) -> None:
        """TPM2_PCR_Reset: only the resettable PCRs (16 debug, 23 application) at locality 0."""
        with self._tss(f"PCR_Reset {pcr}", f"pcr{pcr}"):
            self._ectx.pcr_reset(ESYS_TR.PCR0 + pcr)

    def quote(self, qualifying_data: bytes, pcrs: Sequence[int]) -> Quote:
        """TPM2_Quote over `pcrs` (sha256 bank) with the AK, plus the PCR values it covers.

        The values are read before and after the quote and the pair kept only
        when both reads agree and match the signed digest, so a concurrent
        extend (another process; this object's other threads wait) cannot make
        a quote whose values disagree with its signature.
        """
        if len(qualifying_data) > 64:
            raise TpmError(f"quote: qualifying data is {len(qualifying_data)} bytes (at most 64)")
        sel = _pcr_selection(pcrs)
        scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
        for _ in range(16):
            with self._lock:
                before = self.read_pcrs(pcrs)
                with self._tss("Quote", f"0x{AK_HANDLES[self.ak_alg]:08x}"):
                    attest, sig = self._ectx.quote(self._ak, sel, qualifying_data, scheme, session1=ESYS_TR.PASSWORD)
                after = self.read_pcrs(pcrs)
            attest_bytes = bytes(attest)      # from the TPM itself, through this process's own connection
            if before == after and parse_quote_attest(attest_bytes).pcr_digest == pcr_composite_digest(after, pcrs):
                return Quote(attest_bytes, sig.marshal(), tuple(sorted(set(pcrs))), after)
        raise TpmError("quote: PCRs kept changing during 16 attempts (a writer extends continuously)")

    # -- facts ---------------------------------------------------------------------------------
    def clock_info(self) -> ClockInfo:
        """TPM2_ReadClock: reset_count changes on every TPM reset (reboot, swtpm restart)."""
        with self._tss("ReadClock"):
            t = self._ectx.read_clock()
        c = t.clockInfo
        return ClockInfo(int(c.clock), int(c.resetCount), int(c.restartCount), bool(c.safe))

    def info(self) -> dict:
        """Manufacturer, firmware, banks, AK facts, for `cwlite tpm info`. TPM command: TPM2_GetCapability."""
        props: dict[int, int] = {}
        with self._tss("GetCapability TPM_PROPERTIES"):
            more, data = self._ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.FIXED, 64)
            props.update({int(p.property): int(p.value) for p in data.data.tpmProperties})
            _, banks = self._ectx.get_capability(TPM2_CAP.PCRS, 0, 1)
        manufacturer = props.get(int(TPM2_PT.MANUFACTURER), 0).to_bytes(4, "big").rstrip(b"\0").decode(errors="replace")
        fw = (props.get(_PT_FIRMWARE_VERSION_1, 0) << 32) | props.get(_PT_FIRMWARE_VERSION_1 + 1, 0)
        allocated = [str(TPM2_ALG(s.hash)) for s in banks.data.assignedPCR if any(bytes(s.pcrSelect))]
        clock = self.clock_info()
        return {
            "tcti": self.tcti, "embedded_swtpm": self.swtpm is not None,
            "manufacturer": manufacturer, "firmware_version": f"{fw:016x}", "pcr_banks": allocated,
            "ak": {"alg": self.ak_alg, "handle": f"0x{AK_HANDLES[self.ak_alg]:08x}", "name": self.ak_name().hex()},
            "reset_count": clock.reset_count, "restart_count": clock.restart_count,
        }


def tcti_for(device: str) -> str:
    """A TCTI configuration for a device path (`/dev/tpmrm0`) or a TCTI string passed through."""
    return f"device:{device}" if device.startswith("/") else device


def open_tpm(data_dir: Path, *, device: str | None = None, ak_alg: str = "ecc") -> Tpm:
    """The TPM cwlite uses: `device` when given (a path or a TCTI string), else /dev/tpmrm0
    when present, else the embedded swtpm with its state under `data_dir/swtpm` (the one
    another cwlite process already runs there, or a new one this Tpm stops on close)."""
    if device is None and os.path.exists(TPM_DEVICE):
        device = TPM_DEVICE
    if device is not None:
        if device.startswith("/") and not os.path.exists(device):
            raise TpmError(f"{device}: no such TPM device")
        return Tpm(tcti_for(device), ak_alg=ak_alg)
    sw = Swtpm.attach(Path(data_dir) / "swtpm") or Swtpm.start(Path(data_dir) / "swtpm")
    try:
        return Tpm(sw.tcti, ak_alg=ak_alg, swtpm=sw)
    except BaseException:
        sw.stop()
        raise
