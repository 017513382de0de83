"""Guest-side fixtures of the kernel-IMA suite: booted with `ima_policy=tcb` (tests/vm/test_vm_tier.py SUITES)."""
from tests.vm.guest.conftest import results_dir  # noqa: F401
