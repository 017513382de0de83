"""The evidence of one round, fetched over the attestation channel: a checked quote and log pages.

Each is written once as steps (controlplane.verifier.client) and run over a
blocking or an asynchronous channel. `fetch_quote` asks for a quote over the log PCR and PCRs 0-9 and checks it
(AK signature, nonce bound with the channel's TLS key); a quote valid for
another TLS key is a relay (reason "tls-key"). `fetch_log` reads log entries
from an offset, page by page, parsed by the one ima-ng parser.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from controlplane.core.errors import CwliteError, LogError, VerifyError
from controlplane.core.imalog import BOOT_AGGREGATE_PCRS, LogEntries, LogEntry, parse_ascii
from controlplane.core.quote import Quote, verify_quote
from controlplane.core.wire import API_VERSION, MAX_LOG_PAGE, quote_qualifying_data
from controlplane.verifier.client import Channel, Request, Steps, drive
from controlplane.verifier.store import Host

BOOT_PCRS = BOOT_AGGREGATE_PCRS      # what the sha256 boot_aggregate covers


@dataclass(frozen=True)
class CheckedQuote:
    """A quote whose AK signature and nonce + TLS key binding checked; `pcr_value` is the log PCR's value."""

    quote: Quote
    info: Any                   # the TPMS_ATTEST facts verify_quote decoded (clock, reset_count, ...)
    peer_spki: bytes            # SHA-256 of the TLS key this channel saw (the one the quote binds)
    pcr_value: bytes


def fetch_quote(ch: Channel, host: Host, nonce: bytes) -> CheckedQuote:
    """POST /v1/quote with `nonce` and check the answer against `host`'s pinned AK and this channel's TLS key."""
    return drive(ch, quote_steps(host, nonce))


def quote_steps(host: Host, nonce: bytes, extra_pcrs: tuple[int, ...] = ()) -> Steps[CheckedQuote]:
    """`fetch_quote` as steps (client.drive / drive_async run them); `extra_pcrs` are quoted too."""
    # PCRs 0-9 too: the log's boot_aggregate entry must match them (the log belongs to this boot)
    pcrs = sorted({*BOOT_PCRS, host.pcr, *extra_pcrs})
    resp, peer = yield Request("POST", f"/{API_VERSION}/quote", body={"nonce": nonce.hex(), "pcrs": pcrs})
    try:
        quote = Quote.from_dict(resp["quote"])
    except (KeyError, TypeError, ValueError, CwliteError) as exc:
        raise VerifyError(f"{host.name}: quote: malformed ({exc})", reason="malformed") from exc
    try:
        info = verify_quote(host.ak_public, quote, quote_qualifying_data(nonce, peer))
    except VerifyError as exc:
        if exc.reason != "nonce":
            raise
        claimed = bytes.fromhex(str(resp.get("tls_spki_sha256", "")).strip() or "00")
        if claimed != peer:
            try:
                verify_quote(host.ak_public, quote, quote_qualifying_data(nonce, claimed))
            except VerifyError:
                raise exc from None
            raise VerifyError(f"{host.name}: the quote binds TLS key {claimed.hex()[:16]} but this channel's key "
                              f"is {peer.hex()[:16]}: a relay (man in the middle)", reason="tls-key") from None
        raise
    value = quote.pcr_values.get(host.pcr)
    if value is None:
        raise VerifyError(f"{host.name}: quote: PCR {host.pcr} not quoted", reason="malformed")
    return CheckedQuote(quote, info, peer, value)


def parse_page(text: str, start: int, source: str = "log") -> Sequence[LogEntry]:
    """Entries of one /v1/log page, with their absolute indices (one format, one parser)."""
    try:
        return parse_ascii(text, source=source, start_index=start)
    except LogError as exc:
        raise VerifyError(str(exc), reason="log") from exc   # names the entry by its index in the host's log


def fetch_log(ch: Channel, start: int) -> Sequence[LogEntry]:
    """All entries from `start`, page by page (consecutive pages stay one imalog.LogEntries)."""
    return drive(ch, log_steps(start))


def log_steps(start: int, path: str = f"/{API_VERSION}/log") -> Steps[Sequence[LogEntry]]:
    """`fetch_log` as steps: every entry of the log served at `path` from `start`, page by page."""
    out: Sequence[LogEntry] = LogEntries([], start)
    while True:
        page, _peer = yield Request("GET", path, params={"from": start + len(out), "limit": MAX_LOG_PAGE})
        try:
            text, first, count, total = str(page["ascii"]), int(page["start"]), int(page["count"]), int(page["total"])
        except (KeyError, TypeError, ValueError) as exc:
            raise VerifyError(f"{path}: page malformed ({exc})", reason="protocol") from exc
        entries = parse_page(text, first, path)
        out = out + entries if isinstance(out, LogEntries) else [*out, *entries]
        if count == 0 or first + count >= total:
            return out
