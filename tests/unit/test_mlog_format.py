"""The ima-ng forms, checked against vectors written from the kernel sources by an independent encoder."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from cryptography import x509

from controlplane.core import imalog
from controlplane.core.errors import LogError
from controlplane.core.events import Event, EventKind, parse_ima_name
from controlplane.host import mlog
from tests.vectors import ima_ng_kernel

VECTORS = Path(__file__).resolve().parents[1] / "vectors"


@pytest.fixture(scope="module")
def sample() -> tuple[bytes, str, dict]:
    return ((VECTORS / "ima_ng_sample.bin").read_bytes(), (VECTORS / "ima_ng_sample.ascii").read_text(),
            json.loads((VECTORS / "ima_ng_sample.json").read_text()))


def test_vector_files_are_what_the_independent_encoder_writes(sample) -> None:
    binary, text, meta = sample
    b, t, value, _ = ima_ng_kernel.sample()
    assert (b, t, value.hex()) == (binary, text, meta["sha256_pcr"])


def test_binary_and_ascii_parse_to_the_same_entries(sample) -> None:
    binary, text, meta = sample
    from_bin = imalog.parse_binary(binary)
    from_ascii = imalog.parse_ascii(text)
    assert from_bin == from_ascii
    assert [(e.digest_alg, e.digest.hex(), e.name, e.is_violation, e.template_name, e.signature.hex())
            for e in from_bin] == \
        [(m["alg"], m["digest"], m["name"], m["violation"], m["template"], m["signature"]) for m in meta["entries"]]
    assert [e.index for e in from_bin] == list(range(len(meta["entries"])))


def test_serialisers_reproduce_the_kernel_bytes(sample) -> None:
    binary, text, _ = sample
    entries = imalog.parse_binary(binary)
    assert imalog.to_binary(entries) == binary
    assert imalog.to_ascii(entries) == text
    for e in entries:
        if e.is_violation or e.template_name != imalog.TEMPLATE:
            continue
        again = imalog.LogEntry.new(e.index, e.pcr, e.digest, e.name, e.digest_alg)
        assert again == e and again.binary() == e.binary()


def test_replay_from_either_form_gives_the_sha256_pcr(sample) -> None:
    binary, text, meta = sample
    want = bytes.fromhex(meta["sha256_pcr"])
    assert imalog.replay(imalog.parse_binary(binary), 10) == want
    assert imalog.replay(imalog.parse_ascii(text), 10) == want
    assert imalog.replay(imalog.parse_binary(binary), 11) == bytes(32)   # other PCRs untouched


KERNEL_VECTORS = sorted({p.stem for p in VECTORS.glob("kernel_ima*.bin")})


def _kernel_vector(stem: str) -> tuple[bytes, str, dict, dict[str, dict[int, bytes]]]:
    meta = json.loads((VECTORS / f"{stem}.json").read_text())
    banks = {bank: {int(k): bytes.fromhex(v) for k, v in meta[key].items()}
             for bank, key in (("sha256", "pcrs"), ("sha1", "pcrs_sha1")) if key in meta}
    return (VECTORS / f"{stem}.bin").read_bytes(), (VECTORS / f"{stem}.ascii").read_text(), meta, banks


def test_the_kernel_vectors_cover_every_template_the_kernel_writes() -> None:
    """kernel_ima*: Debian 6.1's own IMA logs (tests/vectors/capture_kernel_ima.py), between them every
    builtin template this kernel has (ima-sigv2 is ima-ngv2 + the sig field both appear with), 3 PCRs, 2 banks."""
    seen, pcrs, banks = set(), set(), set()
    for stem in KERNEL_VECTORS:
        binary, _, _, vector_banks = _kernel_vector(stem)
        entries = imalog.parse_binary(binary)
        seen |= {e.template_name for e in entries}
        pcrs |= {e.pcr for e in entries}
        banks |= set(vector_banks)
    assert set(imalog.TEMPLATES) - seen == {"ima-sigv2"}
    assert pcrs == {10, 11, 12} and banks == {"sha1", "sha256"}


@pytest.mark.parametrize("stem", KERNEL_VECTORS)
def test_a_real_kernels_log_byte_for_byte(stem: str) -> None:
    """Both forms re-render to the kernel's bytes, and the log replays to the vTPM's PCRs in every bank captured."""
    binary, text, meta, banks = _kernel_vector(stem)
    entries = imalog.parse_binary(binary)
    assert len(entries) == meta["entries"]
    assert imalog.to_binary(entries) == binary and imalog.to_ascii(entries) == text
    assert imalog.parse_ascii(text) == entries
    assert [e.binary() for e in imalog.parse_ascii(text)] == [e.binary() for e in entries]
    for bank, pcrs in banks.items():
        replayed = imalog.replay_all(entries, bank=bank)
        assert replayed == {p: pcrs[p] for p in replayed}, bank         # every PCR the log extends
        assert all(v == bytes(len(v)) for p, v in pcrs.items() if p >= 10 and p not in replayed), bank
    assert entries[0].name == "boot_aggregate"
    firmware = banks[entries[0].digest_alg]                              # 'ima': sha1 over PCRs 0-7
    assert entries[0].digest == imalog.boot_aggregate(firmware, entries[0].digest_alg)
    assert entries[0].digest != imalog.BANKS[entries[0].digest_alg](bytes(len(firmware[0]) * 10)).digest()
    assert any(e.is_violation for e in entries)                       # open-writers: zero hash, extends 0xff
    assert any(e.name.endswith("/with_space") for e in entries)       # the kernel's space -> "_"
    # cwlite's writer makes the same bytes as the kernel for the same (digest, name)
    ng = [e for e in entries if not e.is_violation and e.template_name == imalog.TEMPLATE]
    again = [imalog.LogEntry.new(e.index, e.pcr, e.digest, e.name.replace("_", " "), e.digest_alg) for e in ng]
    assert [e.binary() for e in again] == [e.binary() for e in ng]


def test_the_mixed_kernel_log_fields() -> None:
    """kernel_ima_mixed: ima_policy=tcb|critical_data, then per-rule templates; each field as the kernel set it."""
    binary, _, meta, _ = _kernel_vector("kernel_ima_mixed")
    entries = imalog.parse_binary(binary)
    by_name = {e.name.rsplit("/", 1)[-1]: e for e in entries}
    kernel_version = by_name["kernel_version"]                           # critical data, measured at IMA init
    assert kernel_version.template_name == "ima-buf" and kernel_version.field("buf") == meta["kernel"].encode()
    assert kernel_version.digest == hashlib.sha256(meta["kernel"].encode()).digest()
    keys = [e for e in entries if e.template_name == "ima-buf" and e.pcr == 11]   # KEY_CHECK pcr=11
    assert {e.name for e in keys} >= {".builtin_trusted_keys", "_ses"}
    for e in keys:
        cert = x509.load_der_x509_certificate(e.field("buf"))
        assert e.digest == hashlib.sha256(e.field("buf")).digest() and cert.subject
    signed = by_name["signed"]
    assert signed.template_name == "ima-sig" and signed.signature[:3] == bytes([3, 2, 4])   # v2 signature, sha256
    modsig = by_name["ima-modsig_tool"]
    assert modsig.signature == signed.signature and modsig.field("d-modsig") == modsig.field("modsig") == b""
    evm = by_name["evm-sig_tool"]
    assert evm.pcr == 12 and evm.field("xattrnames") == b"security.ima\0"
    assert evm.field("xattrvalues") == signed.signature
    assert int.from_bytes(evm.field("xattrlengths"), "little") == len(signed.signature)
    assert (int.from_bytes(evm.field("iuid"), "little"), int.from_bytes(evm.field("imode"), "little")) == (1003, 0o100755)
    old = by_name["ima_tool"]
    assert old.template_name == "ima" and old.digest_alg == "sha1"
    assert old.digest == hashlib.sha1(Path("/bin/true").read_bytes()).digest()   # recomputed in SHA-1 for 'ima'
    v2 = by_name["ima-ngv2_tool"]
    assert v2.pcr == 11 and v2.fields[0].startswith(b"ima:sha256:\0") and v2.digest == by_name["ima-ng_tool"].digest


def test_a_violation_entry_extends_ff() -> None:
    e = imalog.parse_binary(ima_ng_kernel.entry(10, "sha256", bytes(32), "/x", violation=True)[0])[0]
    assert e.is_violation and e.pcr_digest == b"\xff" * 32


def test_boot_aggregate_is_sha256_over_pcrs_0_to_9() -> None:
    pcrs = {i: hashlib.sha256(bytes([i])).digest() for i in range(24)}
    want = hashlib.sha256(b"".join(pcrs[i] for i in range(10))).digest()
    assert imalog.boot_aggregate(pcrs) == want
    assert Event(EventKind.BOOT_AGGREGATE, want).ima_name() == "boot_aggregate"


def test_names_are_made_kernel_safe_and_still_parse_as_events() -> None:
    ev = Event(EventKind.VIOLATION, hashlib.sha256(b"x").digest(), "tp_build", "exec", "/tmp/a b\nc")
    e = imalog.LogEntry.new(3, 10, ev.digest, ev.ima_name())
    assert e.name == "cwlite:violation:tp_build:exec:/tmp/a_b_c"
    assert " " not in e.ascii().split(" ", 4)[4] and "\n" not in e.ascii()
    back = parse_ima_name(e.digest, e.name)
    assert back is not None and (back.kind, back.label, back.op) == (EventKind.VIOLATION, "tp_build", "exec")
    assert imalog.parse_ascii(e.ascii() + "\n")[0].name == e.name


@pytest.mark.parametrize("cut", [1, 10, 27, 40, 80])
def test_truncated_binary_names_the_entry(sample, cut: int) -> None:
    binary, _, _ = sample
    entries = imalog.parse_binary(binary)
    offset = sum(len(e.binary()) for e in entries[:4])   # inside entry 4
    with pytest.raises(LogError) as err:
        imalog.parse_binary(binary[: offset + cut], source="m.log")
    assert err.value.entry == 4
    assert str(err.value).startswith("m.log: entry 4: ") and "\n" not in str(err.value)


def test_a_flipped_byte_is_refused_naming_its_entry(sample) -> None:
    binary, _, _ = sample
    entries = imalog.parse_binary(binary)
    offset = sum(len(e.binary()) for e in entries[:5])
    for where in (4, 40, len(entries[5].binary()) - 3):   # template hash, digest, name
        bad = bytearray(binary)
        bad[offset + where] ^= 0x01
        with pytest.raises(LogError) as err:
            imalog.parse_binary(bytes(bad))
        assert err.value.entry == 5, str(err.value)


def test_malformed_ascii_lines_name_the_entry(sample) -> None:
    _, text, _ = sample
    lines = text.splitlines(keepends=True)
    cases = {
        "short": lines[2].rsplit(" ", 2)[0] + "\n",
        "template": lines[2].replace("ima-ng", "ima-buf"),
        "unsigned ima-sig": lines[2].replace("ima-ng", "ima-sig"),
        "hex": lines[2].replace("sha1:", "sha1:zz"),
        "hash": lines[2].replace(lines[2].split()[1], "00" * 19 + "01"),
    }
    for what, line in cases.items():
        with pytest.raises(LogError) as err:
            imalog.parse_ascii("".join(lines[:2] + [line] + lines[3:]))
        assert err.value.entry == 2, what


def test_pcr_choice_avoids_the_kernels_ima_pcr(tmp_path: Path) -> None:
    ima = tmp_path / "ascii_runtime_measurements"
    assert mlog.choose_pcr(ima_log=ima) == 10                       # no IMA log: 10
    ima.write_text((VECTORS / "ima_ng_sample.ascii").read_text())    # IMA measures into 10
    assert mlog.kernel_ima_pcrs(ima) == {10}
    assert mlog.choose_pcr(ima_log=ima) == 11
    assert mlog.choose_pcr(fallback=14, ima_log=ima) == 14
    with pytest.raises(LogError):
        mlog.choose_pcr(fallback=10, ima_log=ima)
    with pytest.raises(LogError, match="PCR 10: the kernel's IMA measures into it"):   # before any TPM use
        mlog.MeasurementLog.open(tmp_path / "m.log", None, pcr=10, ima_log=ima)


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=32, max_size=32), st.text(max_size=80)), max_size=8))
def test_any_entries_round_trip_through_both_forms(rows) -> None:
    entries = [imalog.LogEntry.new(i, 10, d, name) for i, (d, name) in enumerate(rows)]
    binary = imalog.to_binary(entries)
    assert imalog.parse_binary(binary) == entries
    assert imalog.parse_ascii(imalog.to_ascii(entries)) == entries
    assert imalog.replay(imalog.parse_ascii(imalog.to_ascii(entries)), 10) == imalog.replay(entries, 10)


_ALGS = {"sha1": 20, "sha256": 32, "sha512": 64}
_WORD = st.text(st.characters(blacklist_characters=" \n\0", blacklist_categories=("Cs",)), max_size=40)


@st.composite
def _any_template_entry(draw, index: int) -> imalog.LogEntry:
    """An entry of any template the kernel writes (or a custom format), its fields drawn by field kind."""
    tname = draw(st.sampled_from([*imalog.TEMPLATES, "d-ng|n-ng|buf", "d-ngv2|n-ng|sig|iuid"]))
    fields = []
    for fid in imalog.template_fields(tname):
        kind = imalog.FIELD_FORMATS[fid]
        alg = draw(st.sampled_from(sorted(_ALGS)))
        if fid == "d":
            fields.append(draw(st.binary(min_size=20, max_size=20)))
        elif fid in ("d-ng", "d-ngv2") or (fid == "d-modsig" and draw(st.booleans())):
            prefix = draw(st.sampled_from(["ima:", "verity:"])) if fid == "d-ngv2" else ""
            fields.append(f"{prefix}{alg}:".encode() + b"\0" + draw(st.binary(min_size=_ALGS[alg], max_size=_ALGS[alg])))
        elif kind == "string":
            if fid in ("n", "n-ng"):                 # a name: at most 40 characters, under the 'ima' 255 bytes
                fields.append(draw(_WORD).encode() + b"\0")
            else:                                    # xattrnames: absent, or names and their NUL
                fields.append(draw(st.sampled_from([b"", draw(_WORD.filter(bool)).encode() + b"\0"])))
        elif kind == "uint":
            fields.append(draw(st.sampled_from([b"", (draw(st.integers(0, 2**16 - 1))).to_bytes(4 if fid != "imode" else 2, "little")])))
        elif fid == "d-modsig":
            fields.append(b"")
        else:
            fields.append(draw(st.binary(max_size=64)))
    return imalog.LogEntry.from_fields(index, draw(st.integers(0, 23)), tname, fields)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_every_template_round_trips_through_both_forms(data) -> None:
    """Any template's entries: binary and ASCII parse back to the same entries and re-render the same bytes;
    each bank's replay agrees whichever form it came from."""
    entries = [data.draw(_any_template_entry(i)) for i in range(data.draw(st.integers(1, 6)))]
    binary, text = imalog.to_binary(entries), imalog.to_ascii(entries)
    assert imalog.parse_binary(binary) == entries
    assert imalog.parse_ascii(text) == entries
    assert imalog.to_binary(imalog.parse_ascii(text)) == binary
    for bank in ("sha1", "sha256", "sha384"):
        assert imalog.replay_all(imalog.parse_ascii(text), bank=bank) == imalog.replay_all(entries, bank=bank)
    for e in entries:
        assert e.bank_digest("sha1") == e.template_hash == hashlib.sha1(e.template_data).digest()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_damaged_input_raises_only_log_errors(data) -> None:
    """Whatever the damage (flips, cuts, junk), a parser answers with entries or a LogError naming one."""
    stem = data.draw(st.sampled_from(["ima_ng_sample", "kernel_ima_v1", "kernel_ima_mixed"]))   # every template
    binary = (VECTORS / f"{stem}.bin").read_bytes()
    text = (VECTORS / f"{stem}.ascii").read_text()
    blob = bytearray(binary)
    for _ in range(data.draw(st.integers(0, 4))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    blob = bytes(blob[: data.draw(st.integers(0, len(blob)))]) + data.draw(st.binary(max_size=16))
    line_text = text[: data.draw(st.integers(0, len(text)))] + data.draw(st.text(max_size=40))
    for parse, arg in ((imalog.parse_binary, blob), (imalog.parse_ascii, line_text)):
        try:
            parse(arg)
        except LogError as exc:
            assert exc.entry is not None and "\n" not in str(exc)


def test_one_replay_from_any_start_value() -> None:
    """replay, replay_prefixes and replay_to are one chain: from reset, or from a verified midpoint."""
    entries = [imalog.LogEntry.new(i, 10 if i % 3 else 11, hashlib.sha256(b"%d" % i).digest(), f"/bin/{i}")
               for i in range(9)]
    values = imalog.replay_prefixes(entries, 10)
    assert values[0] == imalog.ZERO_PCR and values[-1] == imalog.replay(entries, 10)
    assert values[3] == values[4]                       # entry 3 is for PCR 11: PCR 10 unchanged
    assert imalog.replay(entries[5:], 10, start=values[5]) == values[-1]
    assert imalog.replay_prefixes(entries[5:], 10, values[5]) == values[5:]
    assert imalog.replay_to(entries, imalog.ZERO_PCR, values[8], 10) == 8
    assert imalog.replay_to(entries[5:], values[5], values[8], 10) == 3
    assert imalog.replay_to(entries[5:], values[5], values[5], 10) == 0
    assert imalog.replay_to(entries[:4] + entries[5:], imalog.ZERO_PCR, values[9], 10) is None   # one removed


def test_parsed_entries_behave_as_a_list_with_absolute_indices() -> None:
    """parse_ascii's LogEntries: index, negative index, slices keep absolute indices, pages concatenate."""
    entries = [imalog.LogEntry.new(i, 10, hashlib.sha256(b"%d" % (i % 3)).digest(), f"/bin/{i % 3}") for i in range(9)]
    text = imalog.to_ascii(entries)
    page = imalog.parse_ascii(text, start_index=100)
    assert len(page) == 9 and [e.index for e in page] == list(range(100, 109))
    assert page[0].index == 100 and page[-1].index == 108 and page[4:6][0].index == 104
    assert list(page[::2]) == [e._replace(index=e.index + 100) for e in entries[::2]]
    assert imalog.parse_ascii(text) == entries and page != entries
    joined = imalog.parse_ascii(imalog.to_ascii(entries[:4])) + imalog.parse_ascii(imalog.to_ascii(entries[4:]),
                                                                               start_index=4)
    assert isinstance(joined, imalog.LogEntries) and joined == entries
    assert imalog.replay_prefixes(page, 10) == imalog.replay_prefixes(entries, 10)      # the row replay
    assert imalog.replay_to(page[3:], imalog.replay(entries[:3], 10), imalog.replay(entries, 10), 10) == 6
