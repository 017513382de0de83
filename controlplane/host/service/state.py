"""What the service answers from: the TPM, the measurement log, the TLS identity and the active policy."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from controlplane.core.events import Event, EventKind
from controlplane.core.policy import Policy, read_policy
from controlplane.host.service.tls import TlsIdentity


@dataclass(frozen=True)
class ActivePolicy:
    """A loaded policy: its text as served, the parsed Policy and its digest (parsed once per load)."""

    text: str
    policy: Policy
    digest: bytes

    @classmethod
    def of(cls, text: str, policy: Policy) -> "ActivePolicy":
        return cls(text, policy, policy.digest())

    @classmethod
    def read(cls, path: Path) -> "ActivePolicy":
        return cls.of(*read_policy(path))


@dataclass
class ServiceState:
    """What the service answers from. `tpm` and `mlog` follow controlplane.host.tpm / controlplane.host.mlog.

    `policy_path` is the active policy file (replaced atomically by POST /v1/policy); `policy` is
    that file parsed (read at construction when not given, replaced on every push);
    `on_policy(policy)` lets a co-located enforcement engine load a pushed policy;
    `on_quote(nonce)` asks it to log its liveness entry for the nonce before the quote is taken;
    `data_dir` keeps the highest policy serial loaded (controlplane.host.policy_floor): a push of an
    older policy is refused.
    """

    tpm: Any
    mlog: Any
    tls: TlsIdentity
    pcr: int = 10
    policy_path: Path | None = None
    policy: ActivePolicy | None = None
    db_digest: bytes | None = None
    controller_key: Any = None          # Ed25519PublicKey or path: who may push policies
    data_dir: Path | None = None        # where the policy serial floor lives (None: no rollback check)
    kernel_ima: Any = None              # controlplane.host.kernel_ima.KernelImaLog when the kernel runs IMA
    on_policy: Callable[[Policy], None] | None = None
    on_quote: Callable[[bytes], object] | None = None
    metrics: Any = None                 # controlplane.host.metrics.ServiceMetrics: GET /metrics when set
    rate_per_s: float = 50.0
    burst: int = 200
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.policy is None and self.policy_path is not None and Path(self.policy_path).exists():
            self.policy = ActivePolicy.read(Path(self.policy_path))

    def record_tls_key(self) -> None:
        self.mlog.record(Event(EventKind.TLS_KEY, self.tls.spki_sha256, op="serve", subject="attestation-service"),
                         wait=True)
