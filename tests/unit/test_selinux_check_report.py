"""The CW-Lite check's report forms (JSON, text, DOT) and its argument errors, without a policy analysis."""
from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.core.errors import SelinuxError
from controlplane.host.selinux_check import CheckResult, Flow, Step, draw

RULE = "allow user_t cwlite_cdi0_t:file { write };"


def _result() -> CheckResult:
    flows = (Flow("user_t", "cwlite_cdi0_t", (Step("user_t", "cwlite_cdi0_t", 10, (RULE,)),)),
             Flow("tmp_t", "cwlite_tp_build_t", (Step("tmp_t", "unconfined_t", 10, ("allow a", "allow b")),
                                                 Step("unconfined_t", "cwlite_tp_build_t", 10, ('allow "x"',)))))
    return CheckResult(policy="p.33", min_weight=3, low=("tmp_t", "user_t"),
                       high=("cwlite_cdi0_t", "cwlite_tp_build_t"), trusted=("cwlite_t",),
                       filters={"cwlite_tp_build_t": ("node_t",)}, flows=flows)


def test_json_form_has_every_flow_with_its_steps_and_rules() -> None:
    d = _result().as_dict()
    assert d["ok"] is False and d["flows_into_tcb"] == 2
    assert d["high_types_reached"] == ["cwlite_cdi0_t", "cwlite_tp_build_t"]
    assert d["flows"][1]["path"] == ["tmp_t", "unconfined_t", "cwlite_tp_build_t"]
    assert d["flows"][0]["steps"][0] == {"source": "user_t", "target": "cwlite_cdi0_t", "weight": 10, "rules": [RULE]}
    assert CheckResult("p", 3, (), ("h",), (), {}).ok


def test_dot_draws_each_step_once_with_its_first_rule(tmp_path: Path) -> None:
    text = draw(_result(), tmp_path / "f.dot").read_text()
    assert text.startswith("digraph cwlite_flows {")
    assert f'"user_t" -> "cwlite_cdi0_t" [label="{RULE}"' in text
    assert '"tmp_t" -> "unconfined_t" [label="allow a (+1)"' in text
    assert r'label="allow \"x\""' in text       # quotes escaped for DOT
    assert '"cwlite_cdi0_t" [style=filled, fillcolor="#f4cccc"]' in text


def test_graph_needs_a_dot_or_png_name(tmp_path: Path) -> None:
    with pytest.raises(SelinuxError) as info:
        draw(_result(), tmp_path / "f.svg")
    assert info.value.field == "graph" and "f.svg" in str(info.value)


def test_check_help_states_the_default_sets() -> None:
    """The CLI imports SETools only when it checks, so its help repeats the defaults: they must not drift."""
    from click.testing import CliRunner

    from controlplane.cli.main import cli
    from controlplane.host.selinux_check import DEFAULT_HIGH, DEFAULT_MIN_WEIGHT, DEFAULT_TRUSTED, USER_LOW, WORLD_WRITABLE_LOW

    text = " ".join(CliRunner().invoke(cli, ["selinux", "check", "--help"]).output.split())
    for name in (*USER_LOW, *WORLD_WRITABLE_LOW, *DEFAULT_HIGH, *DEFAULT_TRUSTED):
        assert name in text
    assert f"default: {DEFAULT_MIN_WEIGHT};" in text
